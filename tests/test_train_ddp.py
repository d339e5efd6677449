"""Two processes on CPU (torchrun, gloo): real DDP from one shard of 3 samples (fewer shards than
ranks), per-rank random streams, only rank 0 writes, and a resumed 2-process run continues exactly."""
import os
import subprocess
import sys

import pytest

from emo_model import checkpointing as ckpt

from train_helpers import read_metrics, shared_corpus, subprocess_env


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_wav2vec):
    return shared_corpus(tmp_path_factory, tiny_wav2vec)


def _torchrun(corpus, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "emo_model.training", "--stage", "image", "--model", corpus["model"], "--shards", corpus["train"][0],
           "--out", out, "--steps", "3", "--batch-size", "1", "--num-workers", "1", "--save-every", "2",
           "--grad-accum", "2", "--drop-reference", "0.5", "--seed", "4", "--log-with", "none", "--no-progress", *extra]
    run = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    if run.returncode:
        open(out + ".log", "w").write(run.stderr)
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-4000:])
    return run


def test_two_processes_train_in_step_and_resume(corpus, tmp_path):
    out = str(tmp_path / "ddp")
    run = _torchrun(corpus, out)
    # per-sample reference dropout under DDP without find_unused_parameters: the 20 ReferenceNet
    # tensors that cannot get a gradient in stage image are not trained
    assert "not training 20 parameters" in run.stderr
    state = ckpt.read_state(os.path.join(out, "checkpoint-3"))
    assert state["data"]["world_size"] == 2 and state["ranks_in_sync"]  # checked: both ranks hold the same weights
    rng0 = ckpt.load_rng(os.path.join(out, "checkpoint-3"), 0)
    rng1 = ckpt.load_rng(os.path.join(out, "checkpoint-3"), 1)
    assert not rng0["generator"].equal(rng1["generator"])  # each rank draws its own noise / timesteps / dropout
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]  # rank 0 alone writes the log

    resumed = _torchrun(corpus, out, "--resume", os.path.join(out, "checkpoint-2"))
    assert "steps 2 -> 3" in resumed.stdout
    again = read_metrics(out)
    assert [m["step"] for m in again] == [1, 2, 3]
    assert again[2]["loss"] == metrics[2]["loss"] and again[2]["grad_norm"] == metrics[2]["grad_norm"]
    assert ckpt.read_state(os.path.join(out, "checkpoint-3"))["weights_checksum"] == state["weights_checksum"]
