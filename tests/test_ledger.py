"""The source ledger both executors seal through (emo_data/ledger.py): a source is sealed (rows,
then done marker) only when its end and every clip it lists are back, in whatever order the Ray
operators deliver them; plus the Ray build's plan and watchdog."""
from __future__ import annotations

import os

from emo_data.ledger import END, FAILED, GATED, WRITTEN, ClipResult, SourceEnd
from emo_data.ledger import SourceLedger as _Ledger
from emo_data.shards import StreamingTarWriter
from emo_data.staging import is_done, part_path, parts_dir, read_staged
from emo_data.types import Source

from shard_fixtures import make_sample


def _source(name: str) -> Source:
    return Source(path=f"/videos/{name}.mp4", source_id=name, kind="talk", language="en")


def _clip_row(source_id: str, index: int, start_s: float) -> dict:
    return {"status": "clip", "source_id": source_id, "path": f"/videos/{source_id}.mp4", "key": f"{source_id}_{index:05d}",
            "start_s": start_s, "end_s": start_s + 1.6, "duration_s": 1.6}


def _write_part(out: str, source_id: str, index: int) -> str:
    key, members, meta = make_sample(index, frames=8, with_audio_emb=False, source_id=source_id)
    key = f"{source_id}_{index:05d}"
    os.makedirs(parts_dir(out, source_id), exist_ok=True)
    writer = StreamingTarWriter(part_path(out, source_id, key))
    writer.write(key, members, dict(meta, key=key))
    writer.close()
    return key


def test_source_is_sealed_only_when_every_clip_is_back_in_any_order(tmp_path):
    out = str(tmp_path)
    src = _source("talk_a")
    ledger = _Ledger([src], out)
    k0, k1 = _write_part(out, "talk_a", 0), _write_part(out, "talk_a", 1)
    rejected = {"status": "rejected", "source_id": "talk_a", "path": src.path, "start_s": 0.0, "end_s": 0.5,
                "duration_s": 0.5, "reason": "no_face"}
    # the second clip's write comes back before the source's end row, the first one after it
    assert ledger.add("talk_a", WRITTEN, ClipResult(k1, _clip_row("talk_a", 1, 3.0))) is None
    assert ledger.add("talk_a", END, SourceEnd([k0, k1], [rejected], {"duration_s": 6.0, "clips": 2}, None)) is None
    assert not is_done(out, "talk_a")
    outcome = ledger.add("talk_a", WRITTEN, ClipResult(k0, _clip_row("talk_a", 0, 1.0)))
    assert outcome.status == "ok" and outcome.summary["clips"] == 2 and is_done(out, "talk_a")
    rows = read_staged(out, "talk_a")["rows"]
    assert [(r["status"], r.get("key")) for r in rows] == [("rejected", None), ("clip", k0), ("clip", k1)]
    # a retried block repeating the source changes nothing
    assert ledger.add("talk_a", WRITTEN, ClipResult(k0, _clip_row("talk_a", 0, 1.0))) is None


def test_a_failed_clip_fails_its_source_and_drops_its_parts(tmp_path):
    out = str(tmp_path)
    ledger = _Ledger([_source("talk_b")], out)
    k0, k1 = _write_part(out, "talk_b", 0), _write_part(out, "talk_b", 1)
    failed = {"status": "failed", "source_id": "talk_b", "path": "/videos/talk_b.mp4", "reason": "exception",
              "stage": "audio_features", "detail": "RuntimeError: boom"}
    ledger.add("talk_b", WRITTEN, ClipResult(k0, _clip_row("talk_b", 0, 0.0)))
    ledger.add("talk_b", END, SourceEnd([k0, k1], [], {"duration_s": 4.0}, None))
    assert ledger.add("talk_b", FAILED, ClipResult(k1, failed)).status == "failed"
    rows = read_staged(out, "talk_b")["rows"]
    assert len(rows) == 1 and rows[0]["stage"] == "audio_features" and rows[0]["reason"] == "exception"
    assert not os.path.exists(parts_dir(out, "talk_b"))


def test_source_level_failure_seals_at_once_and_restart_forgets(tmp_path):
    out = str(tmp_path)
    ledger = _Ledger([_source("bad"), _source("later")], out)
    failure = {"status": "failed", "source_id": "bad", "path": "/videos/bad.mp4", "reason": "unreadable", "stage": "probe"}
    assert ledger.add("bad", END, SourceEnd([], [], {"duration_s": 0.0}, failure)).status == "failed"
    k0 = _write_part(out, "later", 0)
    ledger.add("later", END, SourceEnd([k0], [], {"duration_s": 2.0}, None))
    ledger.restart(["later"])  # a new round redoes the source: what came back before is forgotten
    assert ledger.add("later", WRITTEN, ClipResult(k0, _clip_row("later", 0, 0.0))) is None
    assert not is_done(out, "later")


def test_shipped_executor_configs_load():
    import glob
    import json

    from emo_data.config import ExecutorConfig, StageResources

    from conftest import REPO

    paths = sorted(glob.glob(str(REPO / "configs" / "executor-*.json")))
    assert paths
    for path in paths:
        with open(path) as fh:
            config = ExecutorConfig.from_dict(json.load(fh))
        audio = config.resources_for("audio_features", StageResources())
        assert isinstance(audio, StageResources) and audio.concurrency == 8


def test_plan_fits_the_pools_into_the_cluster_or_says_why():
    import pytest

    from emo_data.config import BuildConfig, ExecutorConfig
    from pipelines.ray_build import _plan

    config = BuildConfig()
    plan = _plan(config, ExecutorConfig(), sources=30, cpus=8, gpus=0)
    wav2vec = plan.steps["audio_features"]
    assert (plan.video_actors, wav2vec["workers"], plan.analyse_actors, wav2vec["num_gpus"]) == (8, 4, 2, 0.0)
    assert list(plan.steps) == ["sync_gate", "head_pose", "audio_features", "write"]
    on_gpus = _plan(config, ExecutorConfig(), sources=30, cpus=8, gpus=2)
    wav2vec = on_gpus.steps["audio_features"]
    assert wav2vec["num_gpus"] == 1.0 and wav2vec["workers"] == 2 and on_gpus.analyse_gpus == 0.0
    # the weight-free sync gate wants no GPU; SyncNet takes one per actor
    assert on_gpus.steps["sync_gate"]["num_gpus"] == 0.0
    syncnet = BuildConfig()
    syncnet.sync.syncnet_weights = "syncnet_v2.model"
    shared = _plan(syncnet, ExecutorConfig(), sources=30, cpus=8, gpus=4)   # SyncNet and wav2vec share 4 GPUs
    assert [(shared.steps[n]["workers"], shared.steps[n]["num_gpus"]) for n in ("sync_gate", "audio_features")] == [(2, 1.0), (2, 1.0)]
    one = _plan(syncnet, ExecutorConfig(), sources=30, cpus=8, gpus=1)      # ... or half a GPU each
    assert [(one.steps[n]["workers"], one.steps[n]["num_gpus"]) for n in ("sync_gate", "audio_features")] == [(1, 0.5), (1, 0.5)]
    # wav2vec asking for 2 CPUs per actor on a 4-CPU machine: video actors make room for it
    executor = ExecutorConfig.from_dict({"audio_features": {"num_cpus": 2, "concurrency": 1}})
    assert _plan(config, executor, sources=30, cpus=4, gpus=0).video_actors == 2
    # one wav2vec actor alone needs more than the machine has: an error that names the knobs
    executor = ExecutorConfig.from_dict({"audio_features": {"num_cpus": 4, "concurrency": 1}})
    with pytest.raises(RuntimeError, match="do not fit"):
        _plan(config, executor, sources=30, cpus=2, gpus=0)


def test_stall_watchdog_ends_an_iteration_that_delivers_nothing():
    """The driver reads Ray Data's rows through _watched: a pipeline that stops delivering (an
    actor that hangs, a retry that can never be scheduled) ends after the timeout instead of
    blocking forever; rows before it, normal ends and errors pass through."""
    import time

    import pytest

    from pipelines.ray_runtime import Watched as _watched

    def stalls():
        yield "a"
        yield "b"
        time.sleep(30)
        yield "never"

    start = time.monotonic()
    rows = _watched(stalls(), timeout_s=1.0, poll_s=0.05)
    assert list(rows) == ["a", "b"] and rows.stalled
    assert time.monotonic() - start < 5
    rows = _watched(iter(range(100)), timeout_s=1.0, poll_s=0.05)
    assert list(rows) == list(range(100)) and not rows.stalled

    def fails():
        yield "a"
        raise RuntimeError("executor died")

    with pytest.raises(RuntimeError, match="executor died"):
        list(_watched(fails(), timeout_s=1.0, poll_s=0.05))


def test_unfinished_source_becomes_a_failed_row_with_its_fingerprint(tmp_path):
    from emo_data.ledger import seal_unfinished as _seal_unfinished
    from emo_data.staging import read_marker

    out = str(tmp_path)
    _write_part(out, "slow", 0)  # half staged when the watchdog fired
    _seal_unfinished(_source("slow"), out, "stalled", "no output for 900 s", {"path": "/videos/slow.mp4"})
    rows = read_staged(out, "slow")["rows"]
    assert [(r["status"], r["reason"], r["stage"]) for r in rows] == [("failed", "stalled", "worker")]
    assert not os.path.exists(parts_dir(out, "slow"))
    marker = read_marker(out, "slow")
    assert marker["status"] == "failed" and marker["fingerprint"]["path"] == "/videos/slow.mp4"


def test_a_clip_the_gate_rejected_resolves_its_key_and_keeps_its_row(tmp_path):
    out = str(tmp_path)
    src = _source("talk_g")
    ledger = _Ledger([src], out)
    k0 = _write_part(out, "talk_g", 0)
    k1 = "talk_g_00001"                      # rejected by the sync gate: no part is written
    gated = {"status": "rejected", "source_id": "talk_g", "path": src.path, "key": k1, "start_s": 3.0, "end_s": 6.0,
             "duration_s": 3.0, "reason": "static_face", "stage": "sync_gate", "sync_decision": "reject"}
    ledger.add("talk_g", END, SourceEnd([k0, k1], [], {"duration_s": 6.0, "clips": 2, "kept_s": 4.6}, None))
    assert ledger.add("talk_g", GATED, ClipResult(k1, gated)) is None
    outcome = ledger.add("talk_g", WRITTEN, ClipResult(k0, _clip_row("talk_g", 0, 1.0)))
    assert outcome.status == "ok" and is_done(out, "talk_g")
    summary = outcome.summary
    # the summary counts what was kept after the gate, not what the video pass cut
    assert summary["clips"] == 1 and abs(summary["kept_s"] - 1.6) < 1e-9
    rows = read_staged(out, "talk_g")["rows"]
    assert [(r["status"], r.get("key"), r.get("reason")) for r in rows] == [("clip", k0, None), ("rejected", k1, "static_face")]
