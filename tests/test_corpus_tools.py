"""add-features, fit-buckets and identity clustering, on corpora built from the real samples."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from emo_data.identity import assign_identities, cluster_embeddings, split_identities
from emo_data.shards import SampleMeta, config_sha256, decode_sample, iter_raw_samples, read_index, validate_shard

from conftest import sample


def _configs(shard: str) -> tuple[dict, set]:
    """The shard index's stored configs and the config_sha256 every sample names."""
    return read_index(shard)["configs"], {SampleMeta.from_json(r["json"]).config_sha256 for r in iter_raw_samples(shard)}


@pytest.fixture(scope="module")
def featureless_corpus(tmp_path_factory):
    from pipelines.cli import main

    folder = tmp_path_factory.mktemp("src")
    manifest = folder / "sources.csv"
    manifest.write_text(
        "path,kind,language\n"
        f"{sample('video/aniportrait__pose_ref_video.mp4')},talk,en\n"
        f"{sample('video/v-express__RD_Radio10_0_clip_0.mp4')},talk,en\n"
    )
    out = tmp_path_factory.mktemp("corpus")
    assert main(["build", str(manifest), "--out", str(out), "--no-audio-features", "--test-fraction", "0", "--executor", "local", "-q"]) == 0
    return out


def test_build_without_features_then_add_them(featureless_corpus, tiny_wav2vec):
    from pipelines.cli import main

    shard = str(featureless_corpus / "train-000000.tar")
    raw = next(iter_raw_samples(shard))
    assert "audio_emb.npy" not in raw and json.loads(raw["json"])["audio_emb"] is None
    (before_ref,) = _configs(shard)[1]
    assert _configs(shard)[0][before_ref]["audio_features"]["enabled"] is False
    assert main(["add-features", str(featureless_corpus), "--audio-encoder", tiny_wav2vec, "-q"]) == 0
    assert validate_shard(shard)[1] == []
    # the samples now reference a config that says so: a new hash, the index holds it (and only it)
    configs, refs = _configs(shard)
    assert len(refs) == 1 and refs != {before_ref} and set(configs) == refs
    (after_ref,) = refs
    assert configs[after_ref]["audio_features"]["enabled"] is True and configs[after_ref]["audio_features"]["encoder"] == tiny_wav2vec
    assert config_sha256(configs[after_ref]) == after_ref
    for raw in iter_raw_samples(shard):
        sample_ = decode_sample(raw)
        T = sample_["json"]["num_frames"]
        assert sample_["audio_emb.npy"].shape == (T, 3, 32)  # tiny model: 2 layers + CNN output, dim 32
        assert sample_["json"]["audio_emb"]["encoder"] == tiny_wav2vec


def test_fit_buckets_rewrites_buckets_from_raw_speeds(featureless_corpus, tmp_path, capsys):
    from pipelines.cli import main

    config_path = tmp_path / "speed.json"
    assert main(["fit-buckets", str(featureless_corpus), "-d", "5", "--write-config", str(config_path), "--apply"]) == 0
    fitted = json.loads(config_path.read_text())["speed"]
    assert len(fitted["centers"]) == 5 and fitted["centers"] == sorted(fitted["centers"])
    shard = str(featureless_corpus / "train-000000.tar")
    assert validate_shard(shard)[1] == []
    for raw in iter_raw_samples(shard):
        s = decode_sample(raw)
        speed = s["head_speed.npy"]
        expected = np.tanh((speed[:, None] - np.array(fitted["centers"])) / np.array(fitted["radii"]) * 3)
        assert s["speed_buckets.npy"].shape == (len(speed), 5)
        np.testing.assert_allclose(s["speed_buckets.npy"], expected, atol=1e-5)
        assert s["json"]["speed_buckets"]["centers"] == pytest.approx(fitted["centers"])
    # the centres sit inside the corpus's speed range
    speeds = np.concatenate([decode_sample(r)["head_speed.npy"] for r in iter_raw_samples(shard)])
    assert speeds.min() <= fitted["centers"][0] and fitted["centers"][-1] <= speeds.max()
    # the build config the samples reference says these buckets too
    configs, refs = _configs(shard)
    assert set(configs) == refs and len(refs) == 1
    stored = configs[next(iter(refs))]
    assert stored["speed"]["centers"] == pytest.approx(fitted["centers"]) and stored["speed"]["radii"] == pytest.approx(fitted["radii"])
    assert config_sha256(stored) == next(iter(refs))


def test_clips_of_one_person_share_an_identity(built_corpus):
    m = pd.read_parquet(built_corpus / "manifest.parquet")
    clips = m[m.status == "clip"]
    # the half-body speaker gives two clips (10 s max each): one person, one identity
    same = clips[clips.source_id == "latentsync__demo2_video"]
    assert len(same) >= 2 and same.identity.nunique() == 1
    # different people in different sources get different identities
    firsts = clips.groupby("source_id").identity.first()
    heads = firsts[[s for s in firsts.index if s.startswith(("sadtalker", "video-retalking"))]]
    assert heads.nunique() == len(heads)


def test_clustering_and_split_are_deterministic():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16))
    emb = np.concatenate([c + 0.01 * rng.normal(size=(5, 16)) for c in centres])
    labels = cluster_embeddings(emb, threshold=0.5)
    assert len(set(labels)) == 4 and all(len(set(labels[i * 5 : i * 5 + 5])) == 1 for i in range(4))
    keys = [f"k{i:03d}" for i in range(len(emb))]
    ids = assign_identities(keys, ["s"] * len(keys), list(emb), [None] * len(keys), 0.5)
    assert ids == assign_identities(keys, ["s"] * len(keys), list(emb), [None] * len(keys), 0.5)
    durations = {f"id{i}": 10.0 for i in range(20)}
    a, b = split_identities(durations, 0.1, seed=3), split_identities(durations, 0.1, seed=3)
    assert a == b and sum(v == "test" for v in a.values()) == 2
    assert split_identities(durations, 0.1, seed=4) != a


def test_shards_grouped_by_kind_and_language(featureless_corpus, tmp_path):
    """Re-finalising a copy of a corpus with --shard-by and a manifest that now says one source is
    singing in Chinese: per-kind/language shards, without restaging (the samples are read back
    from the final shards: staging keeps no parts after a finalisation)."""
    import shutil

    from emo_data.config import BuildConfig
    from emo_data.finalize import finalize_corpus
    from emo_data.types import Source

    out = tmp_path / "grouped"
    shutil.copytree(featureless_corpus, out)
    assert not list((out / "staging").rglob("*.tar"))
    m = pd.read_parquet(out / "manifest.parquet").drop_duplicates("source_id")
    sources = [Source(path=r.path, source_id=r.source_id, kind="singing" if r.source_id.startswith("v-express") else "talk",
                      language="zh" if r.source_id.startswith("v-express") else "en") for r in m.itertuples()]
    config = BuildConfig()
    config.audio_features.enabled = False
    config.identity.test_fraction = 0.0
    config.shards.group_by = ["kind", "language"]
    summary = finalize_corpus(str(out), sources, config)
    assert summary.shards == ["train-singing-zh-000000.tar", "train-talk-en-000000.tar"]
    for name in summary.shards:
        assert validate_shard(str(out / name))[1] == []
        for raw in iter_raw_samples(str(out / name)):
            meta = json.loads(raw["json"])
            assert (meta["kind"], meta["language"]) == tuple(name.split("-")[1:3])
    assert not list(out.glob("train-000000.*"))  # the ungrouped shard was replaced, not left beside them
    regrouped = pd.read_parquet(out / "manifest.parquet")
    assert set(regrouped[regrouped.source_id.str.startswith("v-express")].kind) == {"singing"}
    with pytest.raises(ValueError):
        config.shards.group_by = ["licence"]
        finalize_corpus(str(out), sources, config)
