"""Training smoke test: the three stages on a tiny model, from a shard written in the real schema."""
import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

schema = pytest.importorskip("emo_data.schema", reason="data-side shard schema not importable")
pytest.importorskip("webdataset", reason="webdataset not installed")

from emo_model import EMOModel, speed_bucket_encoding  # noqa: E402
from emo_model.training import TrainConfig, train, trainable_parameter_names  # noqa: E402

torch.set_num_threads(1)
T = 20  # frames per clip (>= n + f = 16)


def _members(rng, with_audio=True):
    frames = (rng.random((T, 64, 64, 3)) * 255).astype(np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[12:52, 16:48] = 255
    speed = rng.random(T).astype(np.float32) * 1.5
    m = {
        "mp4": schema.encode_mp4(list(frames), fps=25),
        "wav": schema.wav_bytes(rng.standard_normal(T * 640).astype(np.float32) * 0.1),
        "face_mask.png": schema.png_bytes(mask),
        "face_boxes.npy": schema.npy_bytes(np.tile(np.array([[16, 12, 48, 52]], np.float32), (T, 1))),
        "landmarks.npy": schema.npy_bytes(np.zeros((T, 68, 2), np.float32)),
        "head_pose.npy": schema.npy_bytes(np.zeros((T, 6), np.float32)),
        "head_speed.npy": schema.npy_bytes(speed),
        "speed_buckets.npy": schema.npy_bytes(speed_bucket_encoding(speed)),
        "identity_emb.npy": schema.npy_bytes(np.zeros(128, np.float32)),
        "json": json.dumps({"schema_version": schema.SCHEMA_VERSION}).encode(),
    }
    if with_audio:  # tiny wav2vec2: 3 hidden states of 32 dims
        m["audio_emb.npy"] = schema.npy_bytes(rng.standard_normal((T, 3, 32)).astype(np.float16))
    return m


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from emo_model.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("train")
    model_dir = make_tiny_model(str(root / "model"))
    rng = np.random.default_rng(0)
    shard = str(root / "train-000000.tar")
    samples = [(f"clip_{i:05d}", _members(rng, with_audio=i != 1), {"i": i}) for i in range(3)]
    schema.write_tar(shard, samples)
    return model_dir, shard, root


def _groups(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("stage", ["image", "video", "speed"])
def test_stage_step(setup, stage, tmp_path):
    from emo_model.training import load_components

    model_dir, shard, _ = setup
    cfg = TrainConfig(stage=stage, model=model_dir, shards=[shard], out=str(tmp_path / "run"), steps=2,
                      batch_size=1, num_workers=0, drop_reference=0, drop_audio=0, drop_motion=0, lr=1e-5)
    components = load_components(cfg)
    model = components[0]
    before = _groups(model)
    result = train(cfg, components=components)
    assert len(result["losses"]) == 2 and all(np.isfinite(result["losses"]))
    after = _groups(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    trainable = set(trainable_parameter_names(model, stage))
    assert changed and changed <= trainable  # frozen parameters never move
    if stage == "image":
        assert not any(".motion_modules." in n or "audio" in n or "speed" in n for n in trainable)
        assert any(n.startswith("reference_net.") for n in changed) and any(n.startswith("face_locator.") for n in changed)
    if stage == "video":
        assert any(".motion_modules." in n for n in changed) and any(".audio_attn." in n for n in changed)
        assert not any(".speed_" in n or n.startswith("speed_proj.") for n in trainable)
    if stage == "speed":
        assert any(".speed_attn." in n for n in changed) and any(".motion_modules." in n and ".speed_" not in n for n in changed)
        assert not any("audio" in n for n in trainable)  # audio layers frozen (paper)
        assert not any(n.startswith(("reference_net.", "face_locator.")) for n in trainable)
    saved = EMOModel.from_pretrained(result["checkpoint"])
    s = saved.state_dict()
    assert all(torch.equal(s[n], after[n]) for n in after)
