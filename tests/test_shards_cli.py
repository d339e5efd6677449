"""``emo-shards``: every command on shards made from real footage, and each corruption it must catch."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from emo_data import shards  # noqa: E402
from emo_data.shards_cli import main  # noqa: E402

import shard_fixtures as fx  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """Two valid shards: train (3 samples, audio features) and test (2 samples, none)."""
    from conftest import sample

    sample("video/sadtalker__WDA_KatieHill_000.mp4")  # skips with the documented reason when the footage is absent
    root = str(tmp_path_factory.mktemp("corpus"))
    fx.make_shard(root, n_samples=3, frames=40)
    fx.make_shard(root, n_samples=2, frames=40, with_audio_emb=False, name="test-000000.tar", split="test",
                  kind="singing", language="zh", identity="id_0001", source_id="WDA_KatieHill_001", seed=1)
    return root


@pytest.fixture()
def shard_copy(corpus, tmp_path) -> str:
    """A private copy of the train shard (and its index) to corrupt."""
    src = os.path.join(corpus, "train-000000.tar")
    dst = str(tmp_path / "train-000000.tar")
    shutil.copy(src, dst)
    shutil.copy(shards.index_path_for(src), shards.index_path_for(dst))
    return dst


def run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


# ------------------------------------------------------------------------------------ ls
def test_ls_text_json_dir_and_glob(corpus, capsys):
    rc, out, _ = run(["ls", corpus], capsys)
    assert rc == 0
    assert "train-000000.tar" in out and "test-000000.tar" in out
    assert "total: 2 shards, 5 samples" in out
    rc, out, _ = run(["ls", os.path.join(corpus, "train-*.tar"), "--json"], capsys)
    data = json.loads(out)
    assert rc == 0 and data["total"]["samples"] == 3 and len(data["shards"]) == 1
    shard = data["shards"][0]
    assert shard["index"] is True and shard["splits"] == ["train"]
    assert shard["bytes"] == os.path.getsize(os.path.join(corpus, "train-000000.tar"))
    assert abs(shard["seconds"] - 3 * 40 / 25) < 1e-6


def test_ls_show_stats_over_fsspec_urls(corpus, capsys):
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in glob.glob(os.path.join(corpus, "*")):
        fs.pipe(f"/emo_test_corpus/{os.path.basename(path)}", open(path, "rb").read())
    try:
        rc, out, _ = run(["ls", "memory://emo_test_corpus", "--json"], capsys)
        assert rc == 0 and json.loads(out)["total"]["samples"] == 5
        rc, out, _ = run(["show", "memory://emo_test_corpus/train-000000.tar", "WDA_KatieHill_000_00002"], capsys)
        assert rc == 0 and "float16" in out and "40x3x8" in out
        rc, out, _ = run(["stats", "memory://emo_test_corpus/*.tar", "--frames", "--json"], capsys)
        assert rc == 0 and json.loads(out)["head_speed_deg_per_frame"]["n"] == 5 * 40
    finally:
        fs.rm("/emo_test_corpus", recursive=True)
    rc, out, _ = run(["show", "file://" + os.path.join(corpus, "test-000000.tar"), "--index", "1", "--json"], capsys)
    data = json.loads(out)
    assert rc == 0 and data["key"] == "WDA_KatieHill_001_00001"
    assert {m["member"] for m in data["members"]} == set(shards.REQUIRED_MEMBERS)


def test_index_less_shard_is_scanned(shard_copy, capsys):
    os.remove(shards.index_path_for(shard_copy))
    rc, out, _ = run(["ls", shard_copy], capsys)
    assert rc == 0 and "NO (tar scanned)" in out and "total: 1 shards, 3 samples" in out
    rc, out, _ = run(["show", shard_copy, "--index", "2"], capsys)
    assert rc == 0 and "WDA_KatieHill_000_00002" in out and "40x68x2" in out
    rc, _, err = run(["validate", shard_copy], capsys)
    assert rc == 1


# --------------------------------------------------------------------------------- stats
def test_stats_text_json_plot_and_manifest(corpus, tmp_path, capsys):
    import pandas as pd

    manifest = tmp_path / "manifest.parquet"
    pd.DataFrame({
        "status": ["clip"] * 5 + ["rejected"] * 3 + ["failed"],
        "reason": [None] * 5 + ["no_face", "no_face", "too_short", "corrupt_video"],
        "start_s": [0.0] * 9,
        "end_s": [1.6] * 5 + [3.0, 2.0, 1.0, 0.0],
    }).to_parquet(manifest)
    png = tmp_path / "report.png"
    rc, out, _ = run(["stats", corpus, "--manifest", str(manifest), "--plot", str(png)], capsys)
    assert rc == 0
    assert "2 shards, 5 samples" in out
    for text in ("by split", "by kind", "singing", "by language", "zh", "by identity", "id_0001",
                 "clip length", "face size", "head speed", "speed buckets", "no_face", "corrupt_video"):
        assert text in out, text
    assert 30_000 < png.stat().st_size < 600_000
    import matplotlib.image as mpimg

    h, w = mpimg.imread(str(png)).shape[:2]
    assert w >= 1000 and h >= 600
    rc, out, _ = run(["stats", corpus, "--manifest", str(manifest), "--json"], capsys)
    data = json.loads(out)
    assert data["samples"] == 5 and abs(data["seconds"] - 8.0) < 1e-6
    assert {r["split"]: r["samples"] for r in data["by_split"]} == {"train": 3, "test": 2}
    assert {r["kind"] for r in data["by_kind"]} == {"talk", "singing"}
    assert data["rejections"]["by_status"] == {"clip": 5, "rejected": 3, "failed": 1}
    assert data["rejections"]["by_reason"]["no_face"] == 2
    assert data["rejections"]["seconds_by_reason"]["no_face"] == pytest.approx(5.0)
    assert data["face_size_px"]["n"] == 5 and data["head_speed_measure"] == "clip means"
    assert sum(b["frames"] for b in data["speed_buckets"]) == 5


# ---------------------------------------------------------------------------------- show
def test_show_key_and_index(corpus, capsys):
    shard = os.path.join(corpus, "train-000000.tar")
    rc, out, _ = run(["show", shard, "WDA_KatieHill_000_00001"], capsys)
    assert rc == 0
    for text in ("key:   WDA_KatieHill_000_00001", "num_frames", "h264 yuv420p", "40x512x512x3", "25 fps",
                 "int16 PCM mono", "25600", "40x4", "40x68x2", "40x6", "40x9", "128", "40x3x8", "float16",
                 "512x512"):
        assert text in out, text
    rc, out, _ = run(["show", shard, "--index", "0", "--json"], capsys)
    data = json.loads(out)
    assert data["meta"]["num_frames"] == 40
    shapes = {m["member"]: (m.get("dtype"), m.get("shape")) for m in data["members"]}
    assert shapes["landmarks.npy"] == ("float32", [40, 68, 2])
    assert shapes["audio_emb.npy"] == ("float16", [40, 3, 8])
    rc, _, err = run(["show", shard, "no_such_key"], capsys)
    assert rc == 2 and "no_such_key" in err


# -------------------------------------------------------------------------------- render
def test_render_sheet_and_video(corpus, tmp_path, capsys):
    import av

    shard = os.path.join(corpus, "train-000000.tar")
    png, mp4 = tmp_path / "sheet.png", tmp_path / "clip.mp4"
    rc, out, _ = run(["render", shard, "WDA_KatieHill_000_00000", "--out", str(png), "--video", str(mp4)], capsys)
    assert rc == 0 and "no audio features" not in out
    assert 100_000 < png.stat().st_size < 2_000_000
    with av.open(str(mp4)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        assert container.streams.audio and container.streams.audio[0].codec_context.name == "aac"
        frames = [f for f in container.decode(video=0)]
    assert len(frames) == 40 and frames[0].width == 512
    with av.open(str(mp4)) as container:
        samples = sum(f.samples for f in container.decode(audio=0))
    assert abs(samples - 40 * 16000 / 25) <= 2048
    # the overlay is drawn: the first frame differs from the stored clip inside the face box
    raw = shards.read_sample(shard, key="WDA_KatieHill_000_00000")
    clean = shards.decode_mp4(raw["mp4"], max_frames=1)[0].astype(np.int16)
    drawn = frames[0].to_ndarray(format="rgb24").astype(np.int16)
    x0, y0, x1, y1 = shards.load_npy(raw["face_boxes.npy"])[0].astype(int)
    assert np.abs(drawn[y0:y1, x0:x1] - clean[y0:y1, x0:x1]).mean() > 5


def test_render_without_audio_features(corpus, tmp_path, capsys):
    png = tmp_path / "sheet.png"
    rc, out, _ = run(["render", os.path.join(corpus, "test-000000.tar"), "--index", "1", "--out", str(png)], capsys)
    assert rc == 0 and "no audio features" in out and png.stat().st_size > 50_000


# ------------------------------------------------------------------------------ validate
def test_validate_good_corpus_serial_and_jobs(corpus, capsys):
    rc, out, err = run(["validate", corpus], capsys)
    assert rc == 0 and out == "" and "samples/s" in err and "5 samples" in err
    rc, out, err = run(["validate", os.path.join(corpus, "*.tar"), "--jobs", "2"], capsys)
    assert rc == 0 and "OK" in err and "jobs=2" in err


def _issues(out: str) -> list[tuple[str, str, str]]:
    return [tuple(line.split("\t", 2)) for line in out.splitlines() if line.count("\t") >= 2]


def test_validate_truncated_tar(shard_copy, capsys):
    fx.truncate_shard(shard_copy, 0.6)
    rc, out, err = run(["validate", shard_copy], capsys)
    issues = _issues(out)
    assert rc == 1 and "FAILED" in err
    assert all(s == shard_copy for s, _, _ in issues)
    reasons = " | ".join(r for _, _, r in issues)
    assert "truncated" in reasons and "tar is not intact" in reasons
    assert any(k == "WDA_KatieHill_000_00002" and "missing from the tar" in r for _, k, r in issues)


def test_validate_bit_flip(shard_copy, capsys):
    fx.flip_bit(shard_copy, "WDA_KatieHill_000_00001", "landmarks.npy", byte=500)
    rc, out, _ = run(["validate", shard_copy], capsys)
    issues = _issues(out)
    assert rc == 1 and len(issues) == 1
    assert issues[0][1] == "WDA_KatieHill_000_00001" and "landmarks.npy: SHA-256 differs" in issues[0][2]


def test_validate_missing_member(shard_copy, capsys):
    fx.drop_member(shard_copy, "WDA_KatieHill_000_00000", "head_pose.npy")
    rc, out, _ = run(["validate", shard_copy], capsys)
    reasons = [r for _, k, r in _issues(out) if k == "WDA_KatieHill_000_00000"]
    assert rc == 1
    assert "missing members: head_pose.npy" in reasons
    assert "head_pose.npy: listed in the shard index but absent from the tar" in reasons


def test_validate_feature_frame_count(shard_copy, capsys):
    wrong = np.zeros((39, 3, 8), np.float16)
    fx.replace_member(shard_copy, "WDA_KatieHill_000_00002", "audio_emb.npy", shards.npy_bytes(wrong))
    rc, out, _ = run(["validate", shard_copy], capsys)
    issues = _issues(out)
    assert rc == 1 and len(issues) == 1  # the digest agrees: only the shape check fires
    assert issues[0][1] == "WDA_KatieHill_000_00002"
    assert issues[0][2] == "audio_emb.npy: shape (39, 3, 8), expected (40, 3, 8)"


def test_validate_jobs_reports_each_bad_shard(corpus, shard_copy, tmp_path, capsys):
    fx.flip_bit(shard_copy, "WDA_KatieHill_000_00000", "wav", byte=2000)
    rc, out, err = run(["validate", shard_copy, os.path.join(corpus, "test-000000.tar"), "-j", "2"], capsys)
    issues = _issues(out)
    assert rc == 1 and [(k, "wav: SHA-256" in r) for _, k, r in issues] == [("WDA_KatieHill_000_00000", True)]
    assert "- 2 shards, 5 samples in" in err and "FAILED: 1 issues in 1 shards" in err


def test_pickle_member_refused(shard_copy, tmp_path, capsys):
    members = fx._read_members(shard_copy) + [("WDA_KatieHill_000_00000.pkl", b"\x80\x04K\x01.")]
    fx._rewrite(shard_copy, members)
    os.remove(shards.index_path_for(shard_copy))
    rc, out, _ = run(["validate", shard_copy], capsys)
    assert rc == 1 and "unsafe member pkl (pickle-like)" in out
    rc, out, _ = run(["show", shard_copy, "WDA_KatieHill_000_00000"], capsys)
    assert rc == 0 and "REFUSED" in out
    rc, _, err = run(["sample", shard_copy, "-n", "3", "--out", str(tmp_path / "out")], capsys)
    assert "refusing member 'pkl'" in err
    assert not glob.glob(str(tmp_path / "out" / "*" / "pkl"))


# -------------------------------------------------------------------------------- sample
def test_sample_random_subset(corpus, tmp_path, capsys):
    out_dir = tmp_path / "subset"
    rc, out, err = run(["sample", corpus, "-n", "4", "--out", str(out_dir), "--seed", "7"], capsys)
    assert rc == 0 and "wrote 4 samples (5 available)" in err
    keys = sorted(os.listdir(out_dir))
    assert len(keys) == 4
    for key in keys:
        files = set(os.listdir(out_dir / key))
        assert set(shards.REQUIRED_MEMBERS) <= files
        meta = json.loads((out_dir / key / "json").read_text())
        assert meta["key"] == key
        assert shards.load_npy((out_dir / key / "head_speed.npy").read_bytes()).shape == (40,)
    again = tmp_path / "again"
    run(["sample", corpus, "-n", "4", "--out", str(again), "--seed", "7"], capsys)
    assert sorted(os.listdir(again)) == keys


# -------------------------------------------------------------------------- console script
def test_console_script(corpus):
    exe = os.path.join(os.path.dirname(sys.executable), "emo-shards")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "emo_data.shards_cli"]
    proc = subprocess.run(cmd + ["ls", "--json", corpus], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["total"]["samples"] == 5
    proc = subprocess.run(cmd + ["validate", os.path.join(corpus, "nothing-*.tar")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no shards match" in proc.stderr


# ------------------------------------------------------------------- byte-range reads only
class _CountingFS:
    """A remote-style fsspec filesystem over local files that records every byte range fetched."""

    @staticmethod
    def register():
        import fsspec
        from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

        class CountingFile(AbstractBufferedFile):
            def _fetch_range(self, start, end):
                self.fs.fetched.append((self.path, start, end))
                with open(self.path, "rb") as fh:
                    fh.seek(start)
                    return fh.read(end - start)

        class CountingFS(AbstractFileSystem):
            protocol = "countfs"
            fetched: list = []

            def info(self, path, **kwargs):
                path = self._strip_protocol(path)
                if not os.path.exists(path):
                    raise FileNotFoundError(path)
                return {"name": path, "size": os.path.getsize(path), "type": "directory" if os.path.isdir(path) else "file"}

            def ls(self, path, detail=True, **kwargs):
                path = self._strip_protocol(path)
                out = [self.info(os.path.join(path, n)) for n in sorted(os.listdir(path))]
                return out if detail else [o["name"] for o in out]

            def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
                return CountingFile(self, path, mode, block_size or 1 << 16, cache_options=cache_options, **kwargs)

        fsspec.register_implementation("countfs", CountingFS, clobber=True)
        return CountingFS


def test_remote_reads_touch_only_the_needed_bytes(corpus, capsys):
    fs_cls = _CountingFS.register()
    shard = os.path.join(corpus, "train-000000.tar")
    size = os.path.getsize(shard)

    def tar_bytes():
        return sum(e - s for p, s, e in fs_cls.fetched if p.endswith(".tar"))

    fs_cls.fetched.clear()
    rc, out, _ = run(["ls", "--json", "countfs://" + corpus], capsys)
    assert rc == 0 and json.loads(out)["total"]["samples"] == 5
    assert tar_bytes() == 0  # sidecars only
    rc, _, _ = run(["stats", "countfs://" + corpus], capsys)
    assert rc == 0 and tar_bytes() == 0
    entry = fx.load_index(shard)["samples"][1]
    locs = entry["members"].values()
    span = max(loc["offset"] + loc["size"] for loc in locs) - min(loc["offset"] for loc in locs)
    fs_cls.fetched.clear()
    rc, out, _ = run(["show", "countfs://" + shard, entry["key"]], capsys)
    assert rc == 0 and "40x68x2" in out
    assert span <= tar_bytes() <= span + (1 << 16) < size * 0.6
    fs_cls.fetched.clear()
    rc, out, _ = run(["stats", "--frames", "--json", "countfs://" + shard], capsys)
    assert rc == 0 and json.loads(out)["head_speed_deg_per_frame"]["n"] == 3 * 40
    assert tar_bytes() < 3 * (1 << 16) + 3 * 40_000 < size / 4  # a few small npy members, not the videos


def test_validate_buckets_inconsistent_with_speed(shard_copy, capsys):
    raw = shards.read_sample(shard_copy, key="WDA_KatieHill_000_00001")
    buckets = shards.load_npy(raw["speed_buckets.npy"])
    fx.replace_member(shard_copy, "WDA_KatieHill_000_00001", "speed_buckets.npy", shards.npy_bytes(np.roll(buckets, 5, axis=0)))
    rc, out, _ = run(["validate", "--no-decode", shard_copy], capsys)
    issues = _issues(out)
    assert rc == 1 and len(issues) == 1 and issues[0][1] == "WDA_KatieHill_000_00001"
    assert "speed_buckets.npy disagrees with tanh((head_speed - c) / r * 3)" in issues[0][2]
