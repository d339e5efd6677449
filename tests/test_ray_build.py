"""The Ray executor on an embedded local Ray (and a loopback `ray start` cluster): same keys as
the in-process executor, kill -9 and resume, a crashing worker becomes a manifest row, the
failure-fraction exit code. Kept small (4 short samples, no wav2vec) to stay well under 4 minutes
on 2 cores."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pandas as pd
import pytest

from emo_data.shards import iter_raw_samples, validate_shard

from conftest import REPO, sample

pytestmark = pytest.mark.ray

SUBSET = [
    ("video/aniportrait__pose_ref_video.mp4", "talk"),
    ("video/video-retalking__face_2.mp4", "talk"),
    ("video/v-express__RD_Radio10_0_clip_0.mp4", "talk"),
    ("video/imageio__realshort.mp4", "film"),
]
CLI = [sys.executable, "-m", "pipelines.cli"]


def _write_manifest(path, rels, extra_rows=()):
    rows = [{"path": sample(rel), "kind": kind, "language": "en", "licence": "test fixture"} for rel, kind in rels]
    rows += list(extra_rows)
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def _manifest(out):
    return pd.read_parquet(os.path.join(out, "manifest.parquet"))


def _shard_keys(out):
    """Every key in the final shards (a list: duplicates would show) after validating each shard."""
    keys = []
    shards = sorted(p for p in os.listdir(out) if p.endswith(".tar"))
    assert shards
    for name in shards:
        count, issues = validate_shard(os.path.join(out, name))
        assert issues == [], issues
        keys += [raw["__key__"] for raw in iter_raw_samples(os.path.join(out, name))]
    return keys


def _rows(m):
    cols = ["source_id", "status", "key", "start_s", "end_s", "reason", "identity", "split", "shard"]
    return m[cols].sort_values(["source_id", "status", "start_s", "key"], na_position="first").reset_index(drop=True)


@pytest.fixture(scope="module")
def subset_manifest(tmp_path_factory):
    return _write_manifest(tmp_path_factory.mktemp("manifest") / "subset.csv", SUBSET)


@pytest.fixture(scope="module")
def local_build(tmp_path_factory, subset_manifest):
    from emo_data.config import BuildConfig
    from pipelines.local import build_corpus

    config = BuildConfig()
    config.audio_features.enabled = False
    out = str(tmp_path_factory.mktemp("local"))
    build_corpus(subset_manifest, out, config, progress=False)
    return out


def test_ray_build_matches_local(tmp_path, subset_manifest, local_build):
    from emo_data.config import BuildConfig
    from pipelines.ray_build import build_corpus_ray

    config = BuildConfig()
    config.audio_features.enabled = False
    out = str(tmp_path / "ray")
    result = build_corpus_ray(subset_manifest, out, config, workers=2, progress=False)
    assert result.processed == len(SUBSET) and result.skipped == 0
    assert result.summary.sources_failed == 0 and result.summary.clips >= 3
    ray_keys, local_keys = _shard_keys(out), _shard_keys(local_build)
    assert len(ray_keys) == len(set(ray_keys))
    assert sorted(ray_keys) == sorted(local_keys)
    pd.testing.assert_frame_equal(_rows(_manifest(out)), _rows(_manifest(local_build)))
    for name in os.listdir(out):
        if name.endswith(".tar"):
            assert os.path.exists(os.path.join(out, name[: -len(".tar")] + ".stats.json"))


def test_actor_killed_mid_source_is_redone_in_a_new_round(tmp_path, subset_manifest, local_build):
    """The video-pass actor dies after its first clip of a source, with no Ray task retry left:
    the source stays unsealed in round 1, and round 2 (started once round 1's actors gave their
    CPUs back; it never got scheduled when they did not) redoes it. The corpus equals the clean
    in-process build; a hang would fail on the pytest timeout."""
    from emo_data.config import BuildConfig, ExecutorConfig
    from pipelines.ray_build import build_corpus_ray

    crashed = "aniportrait__pose_ref_video"
    crashes = tmp_path / "crashes"
    config = BuildConfig()
    config.audio_features.enabled = False
    # FAULT INJECTION hook (pipelines/ray_build.py): os._exit(1) after the first clip, once.
    executor = ExecutorConfig(max_task_retries=0, crash_on_source=f"{crashed},after=1,times=1,state={crashes}")
    out = str(tmp_path / "out")
    manifest = _write_manifest(tmp_path / "two.csv", [SUBSET[0], SUBSET[3]])
    result = build_corpus_ray(manifest, out, config, workers=2, progress=False, executor=executor)
    assert len(os.listdir(crashes)) == 1  # the actor did die mid-source
    info = json.load(open(os.path.join(out, "build.json")))["executor"]
    assert info["rounds"] == 2 and not info["stalled"]
    assert result.summary.sources_failed == 0 and result.summary.clips >= 1
    clean = _manifest(local_build)
    clean = clean[clean.source_id.isin({crashed, "imageio__realshort"})]
    ours = _rows(_manifest(out))
    pd.testing.assert_frame_equal(ours.drop(columns=["split", "shard"]), _rows(clean).drop(columns=["split", "shard"]))
    assert sorted(_shard_keys(out)) == sorted(clean[clean.status == "clip"].key)


def test_kill_minus_9_then_resume_gives_the_clean_keys(tmp_path, subset_manifest, local_build):
    out = tmp_path / "resumed"
    cmd = CLI + ["build", subset_manifest, "--out", str(out), "--no-audio-features", "-q", "--executor", "ray", "--workers", "1"]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    # FAULT INJECTION hook (pipelines/ray_build.py): the worker sleeps after each clip of this
    # source, so the kill lands while it is half staged (a part on disk, no done marker).
    stalled = "v-express__RD_Radio10_0_clip_0"
    # Own session: the kill takes the driver and the embedded Ray it started, like a lost machine.
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=dict(env, EMO_FAULT_STALL_SOURCE=f"{stalled}:60"),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = out / "staging"
    try:
        deadline = time.time() + 150
        while time.time() < deadline and proc.poll() is None:
            if staging.is_dir() and any(p.suffix == ".done" for p in staging.iterdir()) and list(staging.glob(f"{stalled}/*.tar")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the build ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (staging / f"{stalled}.done").exists()  # a part on disk, the source unsealed
    done_at_kill = sorted(p.stem for p in staging.iterdir() if p.suffix == ".done")
    assert 1 <= len(done_at_kill) < len(SUBSET), done_at_kill
    assert not (out / "manifest.parquet").exists()

    res = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed   {len(done_at_kill)} sources were already done, {len(SUBSET) - len(done_at_kill)} processed now" in res.stdout
    keys = _shard_keys(str(out))
    assert len(keys) == len(set(keys))
    assert sorted(keys) == sorted(_shard_keys(local_build))
    pd.testing.assert_frame_equal(_rows(_manifest(str(out))), _rows(_manifest(local_build)))
    assert not list(staging.glob("*.tmp"))


def test_crashing_worker_becomes_a_row_and_failure_fraction_exits_nonzero(tmp_path, monkeypatch, capsys):
    from emo_data.staging import read_staged
    from pipelines.cli import main

    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(20_000))
    manifest = _write_manifest(tmp_path / "poison.csv", SUBSET[1:3],
                               [{"path": str(garbage), "kind": "talk", "language": "en", "licence": ""}])
    poisoned = "v-express__RD_Radio10_0_clip_0"
    out = str(tmp_path / "out")
    # FAULT INJECTION hook (pipelines/ray_build.py): the worker os._exit(1)s on this source.
    monkeypatch.setenv("EMO_FAULT_CRASH_SOURCE", poisoned)
    args = ["build", manifest, "--out", out, "--no-audio-features", "-q", "--executor", "ray", "--workers", "2"]
    code = main(args + ["--max-failure-fraction", "0.5"])
    err = capsys.readouterr().err
    assert code == 1, err[-3000:]  # 2 of 3 failed (crash + garbage) > 0.5
    assert "2 of 3 sources failed" in err and poisoned in err and "worker_crash" in err and "garbage" in err

    m = _manifest(out)
    failed = m[m.status == "failed"].set_index("source_id")
    assert failed.loc[poisoned, "reason"] == "worker_crash" and failed.loc[poisoned, "stage"] == "worker"
    assert failed.loc["garbage", "reason"] == "unreadable"
    assert (m[m.source_id == "video-retalking__face_2"].status == "clip").any()  # the build went on
    assert read_staged(out, poisoned)["rows"][0]["status"] == "failed"
    _shard_keys(out)

    # Re-running resumes: the garbage file stays failed (its own fault), the source lost to a
    # crash is tried again (a crash says nothing about the file) and now yields its clips.
    monkeypatch.delenv("EMO_FAULT_CRASH_SOURCE")
    assert main(args + ["--max-failure-fraction", "0.7"]) == 0
    out_text = capsys.readouterr().out
    assert "resumed   2 sources were already done, 1 processed now" in out_text and "worker_crash" in out_text
    m = _manifest(out)
    assert (m[m.source_id == poisoned].status == "clip").any()
    assert m.set_index("source_id").loc["garbage", "reason"] == "unreadable"


def test_bad_inputs_become_rows_on_ray_and_nothing_sealed_is_lost(tmp_path):
    """Empty, garbage, truncated and audio-less files through the Ray graph: a failed row each,
    naming the file, the stage and the reason; the good source's clips are kept. A re-run with a
    new bad file added processes only that file and keeps everything already sealed. Both builds
    share one Ray, which then reads the shards with ray.data.read_webdataset."""
    import av
    import numpy as np
    import ray

    from emo_data.config import BuildConfig
    from emo_data.readers import read_ray_dataset
    from emo_data.shards import decode_sample
    from pipelines.ray_build import build_corpus_ray

    good = sample(SUBSET[2][0])
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(good, folder / "good.mp4")
    (folder / "zero.mp4").write_bytes(b"")
    data = open(good, "rb").read()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 4])
    with av.open(good) as src, av.open(str(folder / "silent_film.mp4"), "w") as dst:
        out_stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = out_stream
                dst.mux(packet)
    config = BuildConfig()
    config.audio_features.enabled = False
    out = str(tmp_path / "out")
    ray.init(num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False, log_to_driver=False)
    try:
        _bad_inputs_then_one_more(folder, out, config, build_corpus_ray)
        shards = sorted(os.path.join(out, p) for p in os.listdir(out) if p.endswith(".tar"))
        ours = {raw["__key__"]: decode_sample(raw) for shard in shards for raw in iter_raw_samples(shard)}
        rows = read_ray_dataset(shards).take_all()
        assert sorted(r["__key__"] for r in rows) == sorted(ours)
        for row in rows:
            mine = ours[row["__key__"]]
            assert row["mp4"] == mine["mp4"] and row["json"] == mine["json"]
            assert np.array_equal(row["landmarks.npy"], mine["landmarks.npy"])
        plain = ray.data.read_webdataset(shards).take(1)[0]  # Ray's own decoders: media stay bytes
        assert isinstance(plain["mp4"], bytes) and plain["json"]["key"] == plain["__key__"]

        # A config that shapes samples redoes every sealed source through the Ray graph.
        config.clip.min_seconds = 3.0  # the good source's only clip is 2.1 s long
        result = build_corpus_ray(str(folder), out, config, workers=2, progress=False)
        assert (result.processed, result.skipped) == (5, 0) and len(result.plan.redo) == 5
        m = _manifest(out)
        assert not (m.status == "clip").any() and "too_short" in set(m[m.source_id == "good"].reason)
        assert json.load(open(os.path.join(out, "build.json")))["config"]["clip"]["min_seconds"] == 3.0
    finally:
        ray.shutdown()


def _bad_inputs_then_one_more(folder, out, config, build_corpus_ray):
    build_corpus_ray(str(folder), out, config, workers=2, progress=False)
    m = _manifest(out)
    failed = m[m.status == "failed"].set_index("source_id")
    assert failed.loc["zero", "reason"] == "empty_file" and failed.loc["zero", "stage"] == "probe"
    assert failed.loc["silent_film", "reason"] == "no_audio_stream"
    assert failed.loc["truncated", "reason"] in {"unreadable", "corrupt_video", "corrupt_audio"}
    for source_id, row in failed.iterrows():
        assert row.path.endswith(f"{source_id}.mp4") and row.detail
    keys_before = _shard_keys(out)
    assert keys_before and all(k.startswith("good_") for k in keys_before)

    (folder / "garbage.mp4").write_bytes(os.urandom(20_000))
    result = build_corpus_ray(str(folder), out, config, workers=2, progress=False)
    assert (result.processed, result.skipped) == (1, 4)
    assert _manifest(out).set_index("source_id").loc["garbage", "reason"] == "unreadable"
    assert sorted(_shard_keys(out)) == sorted(keys_before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cluster_mode_on_loopback(tmp_path, subset_manifest):
    """`ray start --head` on 127.0.0.1 (own temp dir and process group, so no other Ray on this
    machine is touched), then `emo-data build --executor ray --address 127.0.0.1:<port>`."""
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    port = _free_port()
    # short: Ray's AF_UNIX socket paths under it must stay below 108 bytes
    temp_dir = tempfile.mkdtemp(prefix="emo_ray_", dir="/tmp")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    head_log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         f"--temp-dir={temp_dir}", "--include-dashboard=false", "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=head_log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 90
        while "Ray runtime started" not in (tmp_path / "head.log").read_text():
            assert head.poll() is None and time.time() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(0.5)
        # one source as an fsspec URL: cluster workers open it through fsspec, not a local path
        manifest = _write_manifest(tmp_path / "two.csv", SUBSET[3:],
                                   [{"path": "file://" + sample(SUBSET[2][0]), "kind": "talk", "language": "en", "licence": ""}])
        out = tmp_path / "cluster_out"
        cmd = CLI + ["build", manifest, "--out", str(out), "--no-audio-features", "-q", "--executor", "ray",
                     "--address", f"127.0.0.1:{port}"]
        res = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stderr[-3000:]
        m = _manifest(str(out))
        assert set(m.source_id) == {"v-express__RD_Radio10_0_clip_0", "imageio__realshort"}
        assert (m.status == "clip").sum() >= 1 and not (m.status == "failed").any()
        assert m[m.source_id == "v-express__RD_Radio10_0_clip_0"].path.iloc[0].startswith("file://")
        assert (m[m.source_id == "v-express__RD_Radio10_0_clip_0"].status == "clip").any()
        _shard_keys(str(out))
    finally:
        # Only the process group started above (never `ray stop`, which would stop every Ray of
        # this user on the machine). SIGTERM is slow (~20 s), so give it a moment, then SIGKILL.
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # gcs_server, raylet, workers share the group
        except ProcessLookupError:
            pass
        head.wait(timeout=30)
        head_log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
