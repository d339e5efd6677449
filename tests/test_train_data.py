"""Training data path: the data/model contract, seeded order split by sample across ranks and
workers, exact re-seek, partial reads (frames of an mp4, rows of latents.npy), add-latents."""
import io
import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from emo_data.shards import (  # noqa: E402
    SCHEMA_VERSION,
    decode_mp4,
    iter_raw_samples,
    load_npy,
    read_sample,
    rewrite_shard,
    validate_shard,
)
from emo_model.tiny import tiny_emo_config  # noqa: E402
from emo_model.train_data import (  # noqa: E402
    DataContractError,
    ItemMaker,
    MemberReader,
    ShardStream,
    StreamLayout,
    check_contract,
    decode_frames,
    load_catalog,
)

from train_helpers import copy_shards, shared_corpus  # noqa: E402

torch.set_num_threads(1)


class Cfg:  # the tiny model's config as the contract check reads it
    def __init__(self, **over):
        for k, v in dict(tiny_emo_config(), num_motion_frames=4, num_frames=12, audio_window=2, speed_window=2,
                         speed_buckets=9, **over).items():
            setattr(self, k, v)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_wav2vec):
    return shared_corpus(tmp_path_factory, tiny_wav2vec)


def _edit_meta(shards, fn):
    for shard in shards:
        def transform(raw):
            meta = json.loads(raw["json"].decode())
            fn(meta, raw)
            raw["json"] = json.dumps(meta).encode()
            return raw

        rewrite_shard(shard, transform)


# ----------------------------------------------------------------------------- contract
def test_contract_accepts_the_corpus_and_reports_it(corpus):
    refs = load_catalog(corpus["train"])
    report = check_contract(refs, Cfg(), "video", 64)
    assert len(report.usable) == 6 and report.audio == {"num_layers": 3, "dim": 32, "encoder": report.audio["encoder"]}
    assert report.speed_centers == [0.0, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5] and not report.use_latents


def test_contract_errors_say_what_to_do(corpus, tmp_path):
    refs = load_catalog(corpus["train"])
    with pytest.raises(DataContractError, match=r"7 speed buckets.*speed_buckets=9.*fit-buckets SHARDS -d 9 --apply"):
        check_contract([_with(r, speed_buckets={"centers": [0.1 * i for i in range(7)], "radii": [0.1] * 7}) for r in refs],
                       Cfg(), "speed", 64)
    mixed = refs[:3] + [_with(r, speed_buckets={"centers": [0.1 * i for i in range(9)], "radii": [0.1] * 9}) for r in refs[3:]]
    with pytest.raises(DataContractError, match="disagree on speed-bucket centres.*fit-buckets"):
        check_contract(mixed, Cfg(), "image", 64)
    with pytest.raises(DataContractError, match=r"schema_version 99 .*reads schema_version %d" % SCHEMA_VERSION):
        check_contract([_with(refs[0], schema_version=99)] + refs[1:], Cfg(), "image", 64)
    with pytest.raises(DataContractError, match=r"3 layers x 32 dims.*audio_layers=13 x audio_feature_dim=768.*add-features"):
        check_contract(refs, Cfg(audio_layers=13, audio_feature_dim=768), "video", 64)
    short = [_with(r, num_frames=10) for r in refs]
    with pytest.raises(DataContractError, match=r"no usable samples for stage video.*6 shorter than 16 frames"):
        check_contract(short, Cfg(), "video", 64)
    assert len(check_contract(short, Cfg(), "image", 64).usable) == 6  # stage image needs 1 frame
    with pytest.raises(DataContractError, match="lack latents.npy at resolution 64.*add-latents"):
        check_contract(refs, Cfg(), "image", 64, use_latents="yes")


def _with(ref, **meta):
    from dataclasses import replace

    return replace(ref, meta=replace(ref.meta, **meta))


def test_the_raw_fixture_features_do_not_fit_the_tiny_model(tmp_path, tiny_wav2vec):
    """shard_fixtures writes random 3 x 8 audio features: the contract check refuses them for stage video."""
    from shard_fixtures import make_shard

    shard = make_shard(str(tmp_path), n_samples=1, frames=20)
    with pytest.raises(DataContractError, match="3 layers x 8 dims"):
        check_contract(load_catalog([shard]), Cfg(), "video", 64)


# ----------------------------------------------------------------------------- order
def _maker(stage="video", latents=False):
    return ItemMaker(stage, 64, 4, 12, 2, 2, use_latents=latents)


def _positions(stream, slot, count, skip=0):
    return [(entropy, idx) for _, (entropy, idx) in zip(range(count), stream.indices(slot, skip))]


def test_ranks_and_workers_get_disjoint_samples_from_one_shard(corpus):
    """1 shard of 3 samples, 3 streams (3 ranks x 1 worker): every epoch each sample goes to exactly one
    stream; 2 ranks x 2 workers (4 streams) is refused with the numbers."""
    refs = load_catalog(corpus["train"][:1])
    streams = [ShardStream(refs, _maker(), StreamLayout(seed=5, rank=r, world_size=3, num_workers=1)) for r in range(3)]
    per_epoch = [[idx for _, idx in _positions(s, r, 4)] for r, s in enumerate(streams)]  # 4 epochs
    for epoch in range(4):
        assert sorted(p[epoch] for p in per_epoch) == [0, 1, 2]
    assert [p for p in per_epoch[0]] != [per_epoch[0][0]] * 4  # reshuffled every epoch
    with pytest.raises(DataContractError, match=r"3 usable samples cannot feed 4 data streams \(2 processes x 2 DataLoader workers\).*--num-workers 0"):
        ShardStream(refs, _maker(), StreamLayout(seed=5, rank=0, world_size=2, num_workers=2))


def test_order_is_a_function_of_seed_and_layout(corpus):
    refs = load_catalog(corpus["train"])
    lay = dict(rank=1, world_size=2, num_workers=0)
    a = _positions(ShardStream(refs, _maker(), StreamLayout(seed=1, **lay), shuffle_buffer=4), 1, 9)
    b = _positions(ShardStream(refs, _maker(), StreamLayout(seed=1, **lay), shuffle_buffer=4), 1, 9)
    c = _positions(ShardStream(refs, _maker(), StreamLayout(seed=2, **lay), shuffle_buffer=4), 1, 9)
    assert a == b and [i for _, i in a] != [i for _, i in c]
    # all 4 streams of 2 ranks x 2 workers cover each epoch's 6 samples without overlap (then 1 each left over)
    streams = [ShardStream(refs, _maker(), StreamLayout(seed=1, rank=r, world_size=2, num_workers=2)) for r in range(2)]
    first = [idx for r in range(2) for w in range(2) for _, idx in _positions(streams[r], r * 2 + w, 1)]
    assert len(set(first)) == 4


def test_resampled_streams_are_seeded_and_resumable(corpus):
    refs = load_catalog(corpus["train"])
    s = ShardStream(refs, _maker(), StreamLayout(seed=3), shuffle_buffer=2, resampled=True)
    full = _positions(s, 0, 12)
    assert full[5:] == _positions(s, 0, 7, skip=5)
    other = _positions(ShardStream(refs, _maker(), StreamLayout(seed=3, rank=1, world_size=2), resampled=True,
                                   shuffle_buffer=2), 1, 12)
    assert [i for _, i in other] != [i for _, i in full]


def test_loader_resumes_at_the_exact_item_with_workers(corpus):
    """Two workers, batch 2: a loader rebuilt with the per-worker item counts of 3 consumed batches
    gives exactly batches 4, 5, 6 of an uninterrupted loader (windows and pixels)."""
    from emo_model.train_data import make_loader

    refs = check_contract(load_catalog(corpus["train"]), Cfg(), "video", 64).usable

    def stream(start=(), first=0):
        return ShardStream(refs, _maker(), StreamLayout(seed=7, num_workers=2, start_items=list(start), first_batch=first),
                           shuffle_buffer=3)

    first = stream()
    full = iter(make_loader(first, batch_size=2))
    batches = [next(full) for _ in range(6)]
    del full
    position = first.items_per_stream(3, batch_size=2)
    assert position == [4, 2]  # batches 0 and 2 came from stream 0, batch 1 from stream 1
    resumed = iter(make_loader(stream(position, first=3), batch_size=2))
    for expected in batches[3:]:
        got = next(resumed)
        assert torch.equal(got["window"], expected["window"]) and torch.equal(got["frames"], expected["frames"])
        assert torch.equal(got["audio"], expected["audio"]) and torch.equal(got["speed"], expected["speed"])


# ----------------------------------------------------------------------------- items
def test_item_holds_the_chosen_window_and_conditions(corpus):
    from emo_model.conditioning import window_frames

    refs = load_catalog(corpus["train"])
    ref = refs[0]
    reader = MemberReader()
    item = _maker()(ref, np.random.default_rng(0), reader)
    start, reference = item["window"].tolist()
    raw = read_sample(ref.shard, key=ref.key)
    frames = decode_mp4(raw["mp4"])
    assert torch.equal(item["frames"], torch.from_numpy(frames[start : start + 16]).permute(0, 3, 1, 2))
    assert torch.equal(item["reference"], torch.from_numpy(frames[reference]).permute(2, 0, 1))
    audio = torch.from_numpy(load_npy(raw["audio_emb.npy"]).astype(np.float32))
    expected_audio = window_frames(audio[None], 2, dim=1)[0, start + 4 : start + 16]
    assert torch.equal(item["audio"].float(), expected_audio)
    speed = torch.from_numpy(load_npy(raw["speed_buckets.npy"]))
    assert torch.equal(item["speed"], window_frames(speed[None], 2, dim=1)[0, start : start + 16])
    image = _maker("image")(ref, np.random.default_rng(1), reader)
    t, r = image["window"].tolist()
    assert t != r and torch.equal(image["target"][0], torch.from_numpy(frames[t]).permute(2, 0, 1))


def test_decode_frames_seeks_to_keyframes(tmp_path):
    """With a keyframe every 5 frames the seek path must give the same frames as a full decode."""
    import av

    rng = np.random.default_rng(0)
    src = (rng.random((30, 32, 32, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream("libx264", rate=25)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        s.options = {"g": "5", "keyint_min": "5", "sc_threshold": "0", "bf": "2"}
        for f in src:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    data = buf.getvalue()
    full = decode_mp4(data)
    for wanted in ([0], [29], [12, 3], [17, 18, 19, 20], [7, 7, 22]):
        assert np.array_equal(decode_frames(data, wanted, 25.0), full[wanted]), wanted


# ----------------------------------------------------------------------------- latents
def test_add_latents_writes_valid_members_that_training_reads(corpus, tmp_path):
    from diffusers import AutoencoderKL

    from emo_data.latents import resize_frames
    from pipelines.cli import main

    shards = copy_shards(corpus["train"][:1], str(tmp_path / "shards"))
    vae_dir = os.path.join(corpus["model"], "vae")
    assert main(["add-latents", *shards, "--vae", vae_dir, "--resolution", "64", "-q"]) == 0
    count, issues = validate_shard(shards[0])
    assert count == 3 and not issues, [str(i) for i in issues]
    raw = next(iter_raw_samples(shards[0]))
    meta = json.loads(raw["json"])
    lat = load_npy(raw["latents.npy"])
    assert lat.dtype == np.float16 and lat.shape == (meta["num_frames"], 4, 8, 8)
    assert meta["latents"]["resolution"] == 64 and meta["latents"]["scaling_factor"] == pytest.approx(0.18215)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    frames = resize_frames(decode_mp4(raw["mp4"]), 64)[[0, 5]]
    with torch.no_grad():
        mean = vae.encode(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist.mean
    np.testing.assert_allclose(lat[[0, 5]].astype(np.float32), mean.numpy(), atol=2e-3, rtol=2e-3)

    # training picks them up ("auto") and reads only the window's rows
    report = check_contract(load_catalog(shards), Cfg(), "video", 64)
    assert report.use_latents and report.latents["channels"] == 4
    ref = report.usable[0]
    item = _maker(latents=True)(ref, np.random.default_rng(0), MemberReader())
    start, reference = item["window"].tolist()
    full = load_npy(read_sample(ref.shard, key=ref.key)["latents.npy"])
    assert torch.equal(item["frame_latents"], torch.from_numpy(full[start : start + 16]))
    assert torch.equal(item["reference_latents"], torch.from_numpy(full[reference]))
    assert "frames" not in item
    # another VAE -> refused; a wrong shape -> the validator says so
    with pytest.raises(DataContractError, match="another VAE"):
        check_contract(load_catalog(shards), Cfg(), "video", 64, vae_fingerprint="0123456789abcdef")
    _edit_meta(shards, lambda meta, raw: meta["latents"].update(latent_size=16))
    assert any("latents.npy: shape" in str(i) for i in validate_shard(shards[0], decode_media=False)[1])
