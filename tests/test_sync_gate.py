"""The lip-sync / frozen-face gate on real footage and its variants (tests/sync_media.py).

Cases made from ../shared/samples: a talking head (kept), its voice shifted by 200 ms and
600 ms (offset measured; re-cut when the gate is told to correct), its picture frozen over the
voice and a still photo over speech (``static_face``). The weight-free scorer cannot tell a
dubbed voice from the true one on clips this short (docs/sync.md has the measurement), so that
case is only checked to be scored, not rejected.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from emo_data.config import BuildConfig, SyncConfig
from emo_data.shards import iter_raw_samples, load_wav
from emo_data.sync.base import SyncResult
from emo_data.sync.gate import decide, shift_clip_audio
from emo_data.types import ClipCandidate, Source

import sync_media as media
from conftest import sample as _sample

FPS = 25


def _result(offset, confidence, backend="syncnet", search=15):
    return SyncResult(backend=backend, offset_frames=offset, confidence=confidence,
                      offsets=list(range(-search, search + 1)), curve=[0.0] * (2 * search + 1), curve_kind="distance")


# ------------------------------------------------------------------------------------------ decisions
@pytest.mark.parametrize("offset, conf, motion, expect", [
    (0, 8.0, 5.0, ("keep", None)),
    (1, 8.0, 5.0, ("keep", None)),
    (-5, 8.0, 5.0, ("correct", None)),
    (12, 3.5, 5.0, ("correct", None)),
    (3, 2.0, 5.0, ("reject", "out_of_sync")),       # SyncNet: below LatentSync's 3
    (15, 8.0, 5.0, ("reject", "out_of_sync")),      # at the search limit: may be larger
    (0, 8.0, 0.1, ("reject", "static_face")),       # checked before sync
])
def test_decisions_syncnet_defaults(offset, conf, motion, expect):
    d = decide(_result(offset, conf), motion, None, SyncConfig(syncnet_weights="w.model"))
    assert (d.action, d.reason) == expect
    if d.action == "correct":
        assert d.shift_frames == offset


def test_decisions_envelope_defaults_never_reject_on_confidence_and_correct_only_when_confident():
    cfg = SyncConfig()
    assert decide(_result(0, 0.1, "envelope"), 3.0, None, cfg).action == "keep"
    kept = decide(_result(6, 3.0, "envelope"), 3.0, None, cfg)
    assert kept.action == "keep" and "not corrected" in kept.detail
    assert decide(_result(6, 4.5, "envelope"), 3.0, None, cfg).action == "correct"


def test_decision_thresholds_are_configurable_and_validated():
    cfg = SyncConfig(min_confidence=1.0, correct_min_confidence=0.0, keep_tolerance=0, max_correction=4)
    assert decide(_result(1, 2.0, "envelope"), 3.0, None, cfg).action == "correct"
    assert decide(_result(6, 2.0, "envelope"), 3.0, None, cfg).reason == "out_of_sync"
    assert decide(_result(0, 0.5, "envelope"), 3.0, None, cfg).reason == "out_of_sync"
    assert decide(_result(0, 8.0), 3.0, 0.2, SyncConfig(), min_face_quality=0.5).reason == "low_quality"
    assert decide(None, None, 0.2, SyncConfig(enabled=False), min_face_quality=0.5).reason == "low_quality"
    assert decide(None, 0.0, 0.9, SyncConfig(enabled=False), min_face_quality=0.5).action == "keep"
    with pytest.raises(ValueError):
        SyncConfig(mode="maybe")
    with pytest.raises(ValueError):
        SyncConfig(keep_tolerance=5, max_correction=2)
    with pytest.raises(ValueError):
        SyncConfig(backend="syncnet")  # needs weights


# ------------------------------------------------------------------------------------------ re-cutting audio
def _ramp_clip(num_frames=60, pad=15, valid=None):
    """A clip whose audio context is a ramp: sample i of the context holds i, so every re-cut
    can be checked sample-exactly."""
    per_frame = 640
    n = (num_frames + 2 * pad) * per_frame
    context = np.arange(n, dtype=np.float32)
    from emo_data.shards import encode_mp4

    frames = [np.full((64, 64, 3), 8 * (i % 30), np.uint8) for i in range(num_frames)]
    return ClipCandidate(
        source=Source(path="x.mp4", source_id="x"), clip_index=0, start_s=10.0, fps=FPS, num_frames=num_frames,
        mp4=encode_mp4(frames, FPS), face_boxes=np.zeros((num_frames, 4), np.float32),
        landmarks=np.zeros((num_frames, 68, 2), np.float32), crop_box=np.zeros(4, np.float32), source_size=(64, 64),
        audio=context[pad * per_frame:(pad + num_frames) * per_frame].copy(), sample_rate=16000,
        audio_context=context, audio_pad_frames=pad, audio_valid=valid or (0, n),
        mouth_motion=np.arange(num_frames, dtype=np.float32),
    )


def test_shift_recuts_audio_sample_exactly():
    clip = _ramp_clip()
    out = shift_clip_audio(clip, 5, min_frames=10)
    assert out.num_frames == 60 and out.start_s == 10.0
    np.testing.assert_array_equal(out.audio, np.arange((15 + 5) * 640, (15 + 5 + 60) * 640, dtype=np.float32))
    # the context is re-based: frame t's audio sits at pad + t again
    np.testing.assert_array_equal(out.context_slice(out.audio_context), out.audio)


def test_shift_past_the_source_audio_trims_frames():
    # the source's audio ends 3 frames after the clip: a +5 shift leaves the last 2 frames without audio
    clip = _ramp_clip(valid=(0, (15 + 60 + 3) * 640))
    out = shift_clip_audio(clip, 5, min_frames=10)
    assert out.num_frames == 58
    assert len(out.face_boxes) == len(out.landmarks) == len(out.mouth_motion) == 58
    np.testing.assert_array_equal(out.audio, np.arange(20 * 640, 78 * 640, dtype=np.float32))
    from emo_data.shards import count_mp4_frames

    assert count_mp4_frames(out.mp4)[0] == 58
    # audio starts 4 frames before the clip: a -6 shift trims 2 frames at the start
    clip = _ramp_clip(valid=(11 * 640, (15 + 60 + 15) * 640))
    out = shift_clip_audio(clip, -6, min_frames=10)
    assert out.num_frames == 58 and out.start_s == pytest.approx(10.0 + 2 / FPS)
    np.testing.assert_array_equal(out.mouth_motion, np.arange(2, 60, dtype=np.float32))
    np.testing.assert_array_equal(out.audio[:640], np.arange(11 * 640, 12 * 640, dtype=np.float32))
    assert shift_clip_audio(_ramp_clip(valid=(0, 40 * 640)), 10, min_frames=30) is None


# ------------------------------------------------------------------------------------------ builds on real footage
@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    out = tmp_path_factory.mktemp("sync_variants")
    talk = Path(_sample("video/video-retalking__face_5.mp4"))
    speech = Path(_sample("audio/sadtalker__RD_Radio31_000.wav"))
    paths = {
        "talk": media.with_voice_shifted(talk, out / "talk.mp4", 0.0),
        "late200": media.with_voice_shifted(talk, out / "late200.mp4", 0.2),
        "early600": media.with_voice_shifted(talk, out / "early600.mp4", -0.6),
        "frozen": media.frozen_after(talk, out / "frozen.mp4", 10),
        "still": media.still_photo_over(Path(_sample("images/face_recognition__obama.jpg")), speech, out / "still.mp4", 5.0),
        "dubbed": media.with_voice_of(talk, Path(_sample("video/sadtalker__WDA_KatieHill_000.mp4")), out / "dubbed.mp4"),
    }
    return paths


def _build(tmp_path, names, variants, sync: SyncConfig):
    from pipelines.local import build_corpus

    tmp_path.mkdir(parents=True, exist_ok=True)
    manifest = tmp_path / "sources.csv"
    manifest.write_text("path,kind\n" + "".join(f"{variants[n]},talk\n" for n in names))
    cfg = BuildConfig()
    cfg.audio_features.enabled = False
    cfg.sync = sync
    build_corpus(str(manifest), str(tmp_path / "out"), cfg, progress=False)
    rows = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    samples = {}
    for shard in sorted((tmp_path / "out").glob("*.tar")):
        for raw in iter_raw_samples(str(shard)):
            samples[raw["__key__"]] = raw
    return rows, samples


def _clip_row(rows, source_id):
    got = rows[(rows.source_id == source_id) & (rows.status == "clip")]
    assert len(got) == 1, rows[rows.source_id == source_id][["status", "reason", "detail"]]
    return got.iloc[0]


def test_default_gate_on_real_footage(variants, tmp_path):
    rows, samples = _build(tmp_path, ["talk", "late200", "frozen", "still", "dubbed"], variants, SyncConfig())
    for frozen in ("frozen", "still"):
        got = rows[(rows.source_id == frozen) & (rows.reason == "static_face")]
        assert len(got) == 1 and got.iloc[0].stage == "sync_gate", rows[rows.source_id == frozen][["status", "reason"]]
        assert got.iloc[0].mouth_motion_p90 < 0.05
        assert not (rows[rows.source_id == frozen].status == "clip").any()
    talk = _clip_row(rows, "talk")
    assert talk.mouth_motion_p90 > 1.0 and talk.sync_backend == "envelope"
    meta = json.loads(samples[talk.key]["json"])
    assert meta["sync"]["decision"] == "keep" and len(meta["sync"]["curve"]) == 31
    # the weight-free scorer stores its measurement but does not act on it below its confidence bar
    late = _clip_row(rows, "late200")
    assert late.sync_decision == "keep" and late.audio_shift_frames == 0
    assert abs(late.sync_offset_frames - (talk.sync_offset_frames + 5)) <= 1
    dubbed = _clip_row(rows, "dubbed")
    assert np.isfinite(dubbed.sync_confidence) and dubbed.sync_decision in ("keep", "correct")


def test_confident_offsets_are_corrected_and_the_wav_lines_up(variants, tmp_path):
    """With the correction bar lowered, the offset found on a shifted copy is the applied shift
    (within a frame of the unshifted copy's own offset) and the stored wav is the unshifted voice."""
    rows, samples = _build(tmp_path, ["talk", "late200", "early600"], variants, SyncConfig(correct_min_confidence=0.0))
    natural = int(_clip_row(rows, "talk").sync_offset_frames)
    original = media.read_audio(variants["talk"])
    for name, shift in (("late200", 5), ("early600", -15)):
        row = _clip_row(rows, name)
        applied = int(row.audio_shift_frames)
        assert row.sync_decision == "correct"
        assert abs(applied - (shift + natural)) <= 1, (name, applied, natural)
        wav, sr = load_wav(samples[row.key]["wav"])
        meta = json.loads(samples[row.key]["json"])
        assert meta["sync"]["applied_offset_frames"] == applied and len(wav) == meta["num_frames"] * 640
        # the corrected wav is the unshifted recording at the clip's frames (+ the residual offset)
        start = int(round((row.start_s + (applied - shift) / FPS) * sr))
        reference = original[start:start + len(wav)]
        corr = float(np.corrcoef(wav, reference)[0, 1])
        assert corr > 0.95, (name, corr)


def test_score_mode_keeps_everything_and_no_gate_scores_nothing(variants, tmp_path):
    rows, samples = _build(tmp_path / "score", ["frozen"], variants, SyncConfig(mode="score"))
    row = _clip_row(rows, "frozen")
    assert row.sync_decision == "reject" and row.mouth_motion_p90 < 0.05
    assert json.loads(samples[row.key]["json"])["sync"]["mode"] == "score"
    rows, samples = _build(tmp_path / "off", ["frozen"], variants, SyncConfig(enabled=False))
    row = _clip_row(rows, "frozen")
    assert row.sync_decision is None and json.loads(samples[row.key]["json"])["sync"] is None


def test_vocal_separation_feeds_the_gate_and_features_but_the_wav_stays_the_mix(variants, tmp_path, tiny_wav2vec):
    """A 'singing' source is separated (tiny random MDX-Net loaded the real way), a 'talk' copy of
    the same file is not: same stored wav, different audio features, and each json says why."""
    import shutil

    from test_vocals import export_tiny_mdx

    from pipelines.local import build_corpus

    weights = tmp_path / "mdx_tiny.onnx"
    export_tiny_mdx(weights, dynamic_time=True)
    sung = tmp_path / "sung.mp4"
    shutil.copy(variants["talk"], sung)
    manifest = tmp_path / "sources.csv"
    manifest.write_text(f"path,kind\n{sung},singing\n{variants['talk']},talk\n")
    cfg = BuildConfig()
    cfg.audio_features.encoder = tiny_wav2vec
    cfg.vocals.weights = str(weights)
    build_corpus(str(manifest), str(tmp_path / "out"), cfg, progress=False)
    samples = {}
    for shard in sorted((tmp_path / "out").glob("*.tar")):
        for raw in iter_raw_samples(str(shard)):
            samples[json.loads(raw["json"])["source_id"]] = raw
    sung_meta, talk_meta = (json.loads(samples[k]["json"]) for k in ("sung", "talk"))
    assert sung_meta["vocals"]["separate"] and sung_meta["vocals"]["reason"] == "kind_separated"
    assert sung_meta["vocals"]["weights_sha256"] and sung_meta["audio_source"] == "vocals"
    assert sung_meta["sync"]["audio_source"] == "vocals" and sung_meta["audio_emb"]["audio_source"] == "vocals"
    assert talk_meta["vocals"]["reason"] == "kind_not_separated" and talk_meta["audio_source"] == "mix"
    if sung_meta["start_s"] == talk_meta["start_s"] and sung_meta["num_frames"] == talk_meta["num_frames"]:
        assert samples["sung"]["wav"] == samples["talk"]["wav"]            # the mix, untouched
    from emo_data.shards import load_npy

    sung_emb, talk_emb = load_npy(samples["sung"]["audio_emb.npy"]), load_npy(samples["talk"]["audio_emb.npy"])
    n = min(len(sung_emb), len(talk_emb))
    assert not np.allclose(sung_emb[:n], talk_emb[:n])                     # features heard the vocals


def test_syncnet_backend_runs_in_the_build_on_weights_loaded_the_real_way(variants, tmp_path):
    """--syncnet-weights through the whole build (random weights, so the scores mean nothing):
    the gate decodes each clip, scores it with SyncNet and records LSE-D / LSE-C, the curve and
    which weights it used."""
    import torch
    from test_syncnet import _random_state

    weights = tmp_path / "syncnet_v2.model"
    torch.save(_random_state(0), weights)
    rows, samples = _build(tmp_path, ["talk"], variants,
                           SyncConfig(mode="score", syncnet_weights=str(weights)))
    row = _clip_row(rows, "talk")
    assert row.sync_backend == "syncnet" and np.isfinite(row.sync_min_distance) and np.isfinite(row.sync_confidence)
    gate = json.loads(samples[row.key]["json"])["sync"]
    assert gate["curve_kind"] == "distance" and len(gate["curve"]) == 31 and gate["extra"]["weights"] == "syncnet_v2.model"
