"""Stage chaining (1 -> 2 with AnimateDiff motion modules -> 3), validation videos, TensorBoard,
YAML configs, and one speed-bucket contract from `emo-data fit-buckets --apply` to sampling."""
import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from emo_model import EMOModel, constant_speed_buckets  # noqa: E402
from emo_model.conditioning import DEFAULT_SPEED_CENTERS  # noqa: E402
from emo_model.train_config import TrainConfig  # noqa: E402
from emo_model.training import DataContractError, build_parser, config_from_args, train  # noqa: E402

from train_helpers import copy_shards, shared_corpus  # noqa: E402

torch.set_num_threads(1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_wav2vec):
    return shared_corpus(tmp_path_factory, tiny_wav2vec)


def _weights(checkpoint):
    from safetensors.torch import load_file

    return load_file(os.path.join(checkpoint, "emo", "diffusion_pytorch_model.safetensors"))


def _run(corpus, stage, model, out, **kw):
    settings = dict(stage=stage, model=model, shards=kw.pop("shards", corpus["train"]), out=str(out), steps=1,
                    batch_size=1, num_workers=0, lr=1e-5, log_with=[], progress=False)
    settings.update(kw)
    return train(TrainConfig(**settings))


def test_three_stages_chain_through_checkpoints(corpus, tmp_path):
    from safetensors.torch import save_file

    from emo_model.pipeline import EMOPipeline
    from pipelines.cli import main as data_main

    # stage 1 from the tiny pipeline, with TensorBoard
    s1 = _run(corpus, "image", corpus["model"], tmp_path / "s1", steps=2, log_with=["tensorboard"])["checkpoint"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = str(tmp_path / "s1" / "logs")
    scalars = {}
    for run in [logs] + [os.path.join(dp, d) for dp, ds, _ in os.walk(logs) for d in ds]:
        events = EventAccumulator(run)
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars[tag] = [e.step for e in events.Scalars(tag)]
    assert scalars.get("train/loss") == [1, 2] and {"train/lr", "train/grad_norm", "train/samples_per_s"} <= set(scalars)

    # an AnimateDiff-format motion module for the tiny backbone (original key names, safetensors)
    spatial = _weights(s1)
    motion = {k[len("backbone."):]: torch.randn_like(v) * 0.02 for k, v in spatial.items()
              if ".motion_modules." in k and ".speed_" not in k and k.startswith("backbone.")}
    mm_path = str(tmp_path / "mm_tiny.safetensors")
    save_file(motion, mm_path)

    # stage 2 from the stage-1 checkpoint + motion modules; spatial layers frozen; validation video
    r2 = _run(corpus, "video", s1, tmp_path / "s2", motion_module=mm_path, freeze_spatial=True,
              val_every=1, val_shards=corpus["test"], val_samples=1, val_frames=6, val_inference_steps=1)
    s2 = r2["checkpoint"]
    w2 = _weights(s2)
    for k, v in motion.items():  # loaded, then one step of lr 1e-5 (Adam moves each weight by <= ~lr)
        assert (w2["backbone." + k] - v).abs().max() < 1e-4, k
    for k, v in spatial.items():
        if not any(s in k for s in (".motion_modules.", ".audio_", "audio_proj.", ".speed_", "speed_proj.")):
            assert torch.equal(w2[k], v), k
    with open(os.path.join(s2, "train_config.json")) as fh:
        saved_cfg = json.load(fh)
    assert saved_cfg["stage"] == "video" and saved_cfg["model"] == s1 and saved_cfg["motion_module"] == mm_path
    val = os.path.join(str(tmp_path / "s2"), "validation", "step-1")
    key = sorted(f for f in os.listdir(val) if f.endswith(".mp4"))
    assert len(key) == 1 and os.path.isfile(os.path.join(val, "contact_sheet.png"))
    import av

    with av.open(os.path.join(val, key[0])) as c:
        assert sum(1 for _ in c.decode(video=0)) == 6 and len(c.streams.audio) == 1
    from PIL import Image

    sheet = np.asarray(Image.open(os.path.join(val, "contact_sheet.png")))
    assert sheet.shape[0] >= 2 * 128 and sheet.std() > 10  # two rows of pictures, not a blank image

    # fit the speed buckets to this corpus, then stage 3 from stage 2
    shards = copy_shards(corpus["train"], str(tmp_path / "refit"))
    assert data_main(["fit-buckets", *shards, "-d", "9", "--apply"]) == 0
    from emo_data.shards import read_index

    fitted = read_index(shards[0])["samples"][0]["meta"]["speed_buckets"]
    assert not np.allclose(fitted["centers"], DEFAULT_SPEED_CENTERS)
    s3 = _run(corpus, "speed", s2, tmp_path / "s3", shards=shards)["checkpoint"]
    w3 = _weights(s3)
    assert all(torch.equal(w3[k], w2[k]) for k in w2 if ".audio_" in k or k.startswith("audio_proj."))  # audio frozen
    assert any(not torch.equal(w3[k], w2[k]) for k in w2 if ".speed_attn." in k)

    # the trained model records the buckets; sampling encodes the target speed with them
    config = EMOModel.load_config(os.path.join(s3, "emo"))
    assert config["speed_centers"] == fitted["centers"] and config["speed_radii"] == fitted["radii"]
    pipe = EMOPipeline.from_pretrained(s3)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    original = pipe.emo.encode_speed
    pipe.emo.encode_speed = lambda x: (seen.append(x.clone()), original(x))[1]
    pipe(np.full((64, 64, 3), 128, np.uint8), np.zeros(16000 // 5, np.float32), num_inference_steps=1,
         guidance_scale=1.0, speed=0.7, face_box=(16, 16, 48, 48), max_frames=4, progress=False)
    expected = constant_speed_buckets(0.7, 16, centers=fitted["centers"], radii=fitted["radii"])
    np.testing.assert_allclose(seen[0][0].numpy(), expected, rtol=1e-6)

    # a speed-trained model refuses shards with other buckets (its speed layers would be misread)
    with pytest.raises(DataContractError, match="trained with bucket centres"):
        _run(corpus, "speed", s3, tmp_path / "s3b")


def test_yaml_configs_load_and_flags_override(tmp_path):
    for name in ("stage1-image.yaml", "stage2-video.yaml", "stage3-speed.yaml"):
        cfg = TrainConfig.from_file(os.path.join(REPO, "configs", "train", name))
        assert cfg.stage in ("image", "video", "speed") and cfg.lr == 1e-5
    args = build_parser().parse_args(["--config", os.path.join(REPO, "configs", "train", "stage2-video.yaml"),
                                      "--steps", "5", "--no-use-ema", "--shards", "a.tar", "b.tar"])
    cfg = config_from_args(args)
    assert cfg.steps == 5 and cfg.use_ema is False and cfg.shards == ["a.tar", "b.tar"] and cfg.stage == "video"
    path = tmp_path / "c.json"
    cfg.save(str(path))
    assert TrainConfig.from_file(str(path)) == cfg
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"stage": "video", "learning_rate": 1})
    with pytest.raises(ValueError, match="drop_audio must be in"):
        TrainConfig(drop_audio=1.5)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:  # the 8-bit optimizer is optional: a clear error, before any model is loaded
        with pytest.raises(RuntimeError, match="pip install bitsandbytes"):
            train(TrainConfig(use_8bit_adam=True, shards=["x.tar"], model="nowhere", out=str(tmp_path / "o")))
