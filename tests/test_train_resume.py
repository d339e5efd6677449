"""Resume: a training process killed with SIGKILL and started again with --resume latest ends at the
same step with the same loss curve (bit for bit on CPU) as an uninterrupted run; checkpoints are
atomic, pruned, and samplable as they are."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from emo_model import checkpointing as ckpt  # noqa: E402
from emo_model.training import TrainConfig, train  # noqa: E402

from train_helpers import read_metrics, shared_corpus, subprocess_env  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_wav2vec):
    return shared_corpus(tmp_path_factory, tiny_wav2vec)


def _settings(corpus) -> dict:
    # EMA, warm-up + cosine schedule, min-SNR, noise offset, 2 DataLoader workers, checkpoints at an
    # odd micro-batch count (the workers' rotation must continue, not restart at worker 0)
    return dict(stage="video", model=corpus["model"], shards=corpus["train"], steps=7, batch_size=1, num_workers=2,
                save_every=3, keep_checkpoints=2, seed=3, use_ema=True, lr_warmup_steps=2, lr_scheduler="cosine",
                snr_gamma=5.0, noise_offset=0.05, lr=1e-4, log_with=[], progress=False)


def _cli(settings: dict) -> list:
    args = [sys.executable, "-m", "emo_model.training"]
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            if value:
                args += [flag, *map(str, value)]
            else:
                args += [flag, "none"]
        else:
            args += [flag, str(value)]
    return args


def test_kill_9_then_resume_reproduces_the_uninterrupted_run(corpus, tmp_path):
    settings = _settings(corpus)
    reference = train(TrainConfig(**settings, out=str(tmp_path / "reference")))
    assert reference["step"] == 7

    out = str(tmp_path / "killed")
    cmd = _cli(dict(settings, out=out))
    env = subprocess_env()
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not os.path.isdir(os.path.join(out, "checkpoint-3")):
        assert proc.poll() is None, open(tmp_path / "killed.log").read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(read_metrics(out))
    assert proc.returncode == -signal.SIGKILL and 3 <= killed_at < 7
    assert not os.path.exists(os.path.join(out, "checkpoint-7"))

    resumed = subprocess.run(cmd + ["--resume", "latest"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "steps 3 -> 7" in resumed.stdout

    ours, theirs = read_metrics(out), read_metrics(str(tmp_path / "reference"))
    assert [m["step"] for m in ours] == list(range(1, 8))
    # CPU, one thread, the same operations in the same order: identical numbers, not just close ones
    for a, b in zip(ours, theirs):
        assert (a["loss"], a["lr"], a["grad_norm"]) == (b["loss"], b["lr"], b["grad_norm"]), (a, b)
    for sub in ("emo", "emo_ema"):
        name = os.path.join(sub, "diffusion_pytorch_model.safetensors")
        with open(os.path.join(out, "checkpoint-7", name), "rb") as fa, \
                open(os.path.join(str(tmp_path / "reference"), "checkpoint-7", name), "rb") as fb:
            assert fa.read() == fb.read(), sub
    # --keep-checkpoints 2; no temporary directories left
    assert sorted(os.listdir(out)) == [".components", "checkpoint-6", "checkpoint-7", "metrics.jsonl", "train_config.json"]
    state = ckpt.read_state(os.path.join(out, "checkpoint-7"))
    assert state["step"] == 7 and state["micro_batches"] == 7 and state["data"]["items_per_stream"] == [4, 3]

    # a checkpoint is an EMOPipeline directory: emo-sample takes it as it is (trained or EMA weights)
    from emo_model.cli import main as sample_main

    video = str(tmp_path / "sample.mp4")
    assert sample_main(["--model", os.path.join(out, "checkpoint-7"), "--ema", "--image",
                        "/work/shared/samples/images/face_recognition__obama.jpg", "--face-box", "300,250,600,650",
                        "--audio", "/work/shared/samples/audio/sadtalker__imagine.wav", "--max-seconds", "0.2",
                        "--steps", "1", "--seed", "0", "--quiet", "--out", video]) == 0
    assert os.path.getsize(video) > 0


def test_incomplete_checkpoints_are_never_resumed_from(tmp_path):
    out = tmp_path / "run"
    good = out / "checkpoint-2" / ckpt.STATE_DIR
    good.mkdir(parents=True)
    (good / "state.json").write_text(json.dumps({"step": 2}))
    (out / "checkpoint-4" / "emo").mkdir(parents=True)  # no state.json: never completed
    (out / ".tmp-checkpoint-6-123" / ckpt.STATE_DIR).mkdir(parents=True)  # killed while writing
    assert ckpt.resolve_resume(str(out), "latest") == str(out / "checkpoint-2")
    ckpt.remove_stale(str(out))
    assert not (out / ".tmp-checkpoint-6-123").exists()
    assert ckpt.resolve_resume(str(tmp_path / "empty"), "latest") is None  # --resume latest on a fresh run
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(out), str(out / "checkpoint-4"))


def test_optimizer_and_rng_state_round_trip_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    ckpt.save_structured(opt.state_dict(), str(tmp_path / "opt"))
    assert not any(name.endswith((".pt", ".bin", ".pkl")) for name in os.listdir(tmp_path))
    other = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=5.0)
    other.load_state_dict(ckpt.load_structured(str(tmp_path / "opt")))
    a, b = opt.state_dict(), other.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert all(torch.equal(a["state"][0][k], b["state"][0][k]) for k in a["state"][0])
    import random

    import numpy as np

    g = torch.Generator().manual_seed(1)
    ckpt.save_structured(ckpt.capture_rng(g), str(tmp_path / "rng"))

    def draw():
        return torch.rand(3, generator=g).tolist(), torch.rand(3).tolist(), np.random.rand(2).tolist(), random.random()

    expected = draw()
    ckpt.restore_rng(ckpt.load_structured(str(tmp_path / "rng")), g)
    assert draw() == expected
