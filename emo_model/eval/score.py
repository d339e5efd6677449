"""``emo-eval score``: the paper's metrics over a directory written by ``emo-eval generate``.

Every network is loaded once. Per sample the generated video and the ground-truth clip (read from
the shards, not from the copy in the directory) are cut to the same length; then

- **FID**: 2048-d Inception pool features of every ``fid_frame_stride``-th frame; ground-truth
  frames are resized (area) to the generated size (or both to ``resolution``); Fréchet distance
  between all generated and all real frames.
- **FVD**: I3D features of non-overlapping 16-frame clips (224 x 224, [-1, 1]); Fréchet distance.
- **SyncNet LSE-C / LSE-D** of the generated video and of the ground truth with the sample's audio
  (``emo_data.sync.syncnet``, the lip-sync gate's code), averaged over videos.
- **Offline sync confidence** (no weights; ``emo_data.sync``'s landmark / speech-envelope scorer).
- **F-SIM**: 100 x mean cosine similarity between the reference portrait's face embedding and
  each frame's (reference frame excluded), per video, averaged over videos; the same for the
  ground truth (the paper compares the two).
- **E-FID**: Fréchet distance between the per-frame expression features of generated and real
  frames (reference frame excluded), from the configured extractor.

A metric that cannot run (weights missing, code not installed) is ``{"skipped": reason}``; it
never becomes a number. Each metric that ran records the weights it used (path + SHA-256 prefix).
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import time
from typing import Any, Callable, Optional

import numpy as np

from .config import METRICS, ScoreConfig
from .frechet import frechet_distance_between
from .weights import WeightsMissing, find_known

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
METRIC_ROWS = (  # (metric, field, label) of the printed table
    ("fid", "value", "FID ↓"),
    ("fvd", "value", "FVD ↓"),
    ("syncnet", "lse_c", "SyncNet LSE-C ↑"),
    ("syncnet", "lse_d", "SyncNet LSE-D ↓"),
    ("sync_offline", "confidence", "offline sync confidence ↑"),
    ("fsim", "value", "F-SIM"),
    ("efid", "value", "E-FID ↓"),
)


def _weights_path(cfg: ScoreConfig, explicit: Optional[str], network: str) -> Optional[str]:
    return explicit or find_known(cfg.weights_dir, network)


def _resize(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    h, w = size
    if frames.shape[1:3] == (h, w):
        return frames
    interp = cv2.INTER_AREA if frames.shape[1] > h else cv2.INTER_CUBIC
    return np.stack([cv2.resize(f, (w, h), interpolation=interp) for f in frames])


def _skip_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{text}" if isinstance(exc, WeightsMissing) else f"{type(exc).__name__}: {text}"


def load_generated(gen_dir: str) -> list[dict[str, Any]]:
    """The finished samples' jsons in ``gen_dir``, sorted by key."""
    records = []
    for path in sorted(glob.glob(os.path.join(gen_dir, "*.json"))):
        name = os.path.basename(path)
        if name in ("generate.json",) or name.startswith("scores"):
            continue
        with open(path) as fh:
            record = json.load(fh)
        if "key" in record and "files" in record:
            records.append(record)
    return sorted(records, key=lambda r: r["key"])


class _Engines:
    """The metric networks, each loaded once (or the reason it is skipped)."""

    def __init__(self, cfg: ScoreConfig):
        self.cfg = cfg
        self.skipped: dict[str, str] = {}
        self.fid = self.fvd = self.syncnet = self.sync_offline = self.faces = self.expression = None
        wanted = set(cfg.metrics)
        if "fid" in wanted:
            self._try("fid", self._load_fid)
        if "fvd" in wanted:
            self._try("fvd", self._load_fvd)
        if "syncnet" in wanted:
            self._try("syncnet", self._load_syncnet)
        if "sync_offline" in wanted:
            self._try("sync_offline", self._load_offline_sync)
        face_metrics = [m for m in ("fsim", "efid", "sync_offline") if m in wanted and m not in self.skipped]
        if face_metrics:
            self._try("faces", self._load_faces)
            if "faces" in self.skipped:
                for m in face_metrics:
                    self.skipped[m] = f"face analysis unavailable: {self.skipped['faces']}"
            elif "fsim" in face_metrics:  # only F-SIM needs the identity embedding
                self._try("fsim", lambda: self.faces.load_identity(cfg.identity, cfg.face_model_root))
        if "efid" in wanted and "efid" not in self.skipped:
            self._try("efid", self._load_expression)

    def _try(self, name: str, loader: Callable[[], None]) -> None:
        try:
            loader()
        except Exception as exc:  # noqa: BLE001 - any failure to set up a metric is its skip reason
            self.skipped[name] = _skip_reason(exc)
            logger.warning("%s skipped: %s", name, self.skipped[name])

    def _load_fid(self):
        from .inception import InceptionFeatures

        self.fid = InceptionFeatures(_weights_path(self.cfg, self.cfg.inception_weights, "inception"),
                                     device=self.cfg.device, batch_size=self.cfg.batch_size)

    def _load_fvd(self):
        from .i3d import I3DFeatures

        self.fvd = I3DFeatures(_weights_path(self.cfg, self.cfg.i3d_weights, "i3d"), device=self.cfg.device,
                               clip_frames=self.cfg.fvd_clip_frames, stride=self.cfg.fvd_stride,
                               resolution=self.cfg.fvd_resolution)

    def _load_syncnet(self):
        from .sync import SyncNetScorer

        self.syncnet = SyncNetScorer(_weights_path(self.cfg, self.cfg.syncnet_weights, "syncnet"), device=self.cfg.device,
                                     max_offset=self.cfg.sync_max_offset)

    def _load_offline_sync(self):
        from .sync import OfflineSyncScorer

        self.sync_offline = OfflineSyncScorer(max_offset=self.cfg.sync_max_offset)

    def _load_faces(self):
        from .faces import FaceAnalyzer

        self.faces = FaceAnalyzer(identity_backend=None)  # landmarks (dlib 68); identity below

    def _load_expression(self):
        from .expression import make_expression_extractor

        self.expression = make_expression_extractor(
            self.cfg.expression, _weights_path(self.cfg, self.cfg.deep3d_weights, "deep3d"),
            _weights_path(self.cfg, self.cfg.deep3d_lm3d, "deep3d_lm3d"), device=self.cfg.device)


def _mean(values: list[float]) -> Optional[float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def score_corpus(gen_dir: str, shards: list[str], cfg: Optional[ScoreConfig] = None, progress: bool = True) -> dict[str, Any]:
    """Score every finished sample of ``gen_dir`` against its ground truth in ``shards``."""
    from tqdm.auto import tqdm

    from emo_data.shards import (
        SAMPLE_RATE,
        SampleMeta,
        decode_mp4,
        iter_raw_samples,
        list_shards,
        load_npy,
        load_wav,
        read_index,
        read_sample,
    )

    cfg = cfg or ScoreConfig()
    t_start = time.perf_counter()
    records = load_generated(gen_dir)
    if not records:
        raise ValueError(f"{gen_dir}: no generated samples (run emo-eval generate first)")
    shard_of: dict[str, str] = {}
    for shard in list_shards(shards):
        index = read_index(shard)
        if index is None:
            keys = [raw["__key__"] for raw in iter_raw_samples(shard)]
        else:
            keys = [s["key"] for s in index["samples"]]
        for key in keys:
            shard_of.setdefault(key, shard)
    missing = [r["key"] for r in records if r["key"] not in shard_of]
    if missing:
        raise ValueError(f"{len(missing)} generated samples are not in the given shards: {', '.join(missing[:5])}")

    engines = _Engines(cfg)
    fid_feats: dict[str, list[np.ndarray]] = {"generated": [], "ground_truth": []}
    fvd_feats: dict[str, list[np.ndarray]] = {"generated": [], "ground_truth": []}
    expr_feats: dict[str, list[np.ndarray]] = {"generated": [], "ground_truth": []}
    per_sample: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    frames_total = 0
    sizes = set()
    bar = tqdm(records, desc="score", unit="sample", disable=not progress)
    for record in bar:
        key = record["key"]
        raw = read_sample(shard_of[key], key=key)
        meta = SampleMeta.from_json(raw["json"])
        fps = float(meta.fps)
        with open(os.path.join(gen_dir, record["files"]["generated"]), "rb") as fh:
            gen = decode_mp4(fh.read())
        gt = decode_mp4(raw["mp4"])
        ref_idx = int(record.get("reference_frame", 0))
        reference = gt[ref_idx]  # before cutting: a short generated video may end before the reference frame
        T = min(len(gen), len(gt))
        gen, gt = gen[:T], gt[:T]
        frames_total += T
        audio, _ = load_wav(raw["wav"])
        audio = audio[: int(round(T * SAMPLE_RATE / fps))]
        all_boxes = load_npy(raw["face_boxes.npy"]).astype(np.float32)
        gt_boxes = all_boxes[:T]
        size = (cfg.resolution, cfg.resolution) if cfg.resolution else gen.shape[1:3]
        sizes.add((gen.shape[1], gt.shape[1], size[0]))
        gen_eval, gt_eval = _resize(gen, size), _resize(gt, size)
        scale = np.array([gen.shape[2] / gt.shape[2], gen.shape[1] / gt.shape[1]] * 2, np.float32)
        row: dict[str, Any] = {"frames": T, "identity": meta.identity, "shard": os.path.basename(shard_of[key])}

        def run(name: str, fn: Callable[[], None]) -> None:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - one metric failing on one sample is recorded, not fatal
                errors[f"{key}:{name}"] = _skip_reason(exc)
                logger.warning("%s on %s failed: %s", name, key, errors[f"{key}:{name}"])

        if engines.fid is not None:
            def do_fid():
                s = cfg.fid_frame_stride
                fid_feats["generated"].append(engines.fid.features(gen_eval[::s]))
                fid_feats["ground_truth"].append(engines.fid.features(gt_eval[::s]))
            run("fid", do_fid)
        if engines.fvd is not None:
            def do_fvd():
                g, r = engines.fvd.features(gen_eval), engines.fvd.features(gt_eval)
                fvd_feats["generated"].append(g)
                fvd_feats["ground_truth"].append(r)
                row["fvd_clips"] = len(g)
            run("fvd", do_fvd)

        tracks: dict[str, Any] = {}
        if engines.faces is not None:
            def do_faces():
                embed = "fsim" in cfg.metrics and "fsim" not in engines.skipped
                stride = cfg.face_frame_stride
                tracks["generated"] = engines.faces.track(gen, gt_boxes * scale, embed=embed, embed_stride=stride)
                tracks["ground_truth"] = engines.faces.track(gt, gt_boxes, embed=embed, embed_stride=stride)
                row["face_fallback_frames"] = {k: v.fallback_frames for k, v in tracks.items()}
            run("faces", do_faces)
        keep = np.array([t != ref_idx for t in range(T)]) & (np.arange(T) % cfg.face_frame_stride == 0)
        if "fsim" in cfg.metrics and "fsim" not in engines.skipped and len(tracks) == 2:
            def do_fsim():
                from .faces import cosine

                ref_emb, ref_found = engines.faces.embed_reference(reference, all_boxes[ref_idx])
                row["fsim"] = {"reference_face_detected": ref_found}
                for which, track in tracks.items():
                    sims = cosine(track.embeddings[keep], ref_emb)
                    row["fsim"][which] = float(100.0 * np.nanmean(sims))
            run("fsim", do_fsim)
        if engines.expression is not None and len(tracks) == 2:
            def do_efid():
                ref_lm = engines.faces.track(reference[None], all_boxes[ref_idx][None], embed=False).landmarks[0]
                for which, frames in (("generated", gen), ("ground_truth", gt)):
                    # the reference's landmarks in this video's pixels
                    ref = ref_lm * scale[:2] if which == "generated" else ref_lm
                    expr_feats[which].append(engines.expression.extract(frames[keep], tracks[which].landmarks[keep],
                                                                        reference, ref))
            run("efid", do_efid)
        if engines.syncnet is not None:
            def do_syncnet():
                gen_boxes = tracks["generated"].boxes if tracks else gt_boxes * scale
                boxes = tracks["ground_truth"].boxes if tracks else gt_boxes
                row["syncnet"] = {"generated": engines.syncnet.score(gen, gen_boxes, audio, fps),
                                  "ground_truth": engines.syncnet.score(gt, boxes, audio, fps)}
            run("syncnet", do_syncnet)
        if engines.sync_offline is not None and len(tracks) == 2:
            def do_offline():
                row["sync_offline"] = {
                    which: engines.sync_offline.score(key, frames, tracks[which].landmarks, tracks[which].boxes, audio, fps)
                    for which, frames in (("generated", gen), ("ground_truth", gt))}
            run("sync_offline", do_offline)
        per_sample[key] = row

    metrics: dict[str, Any] = {}
    for name in METRICS:
        if name not in cfg.metrics:
            continue
        if name in engines.skipped:
            metrics[name] = {"skipped": engines.skipped[name]}
    failed = {name for name in METRICS if any(k.endswith(f":{name}") for k in errors)}
    if "faces" in {k.split(":")[-1] for k in errors}:
        failed |= {"fsim", "efid", "sync_offline"}

    def fail(name: str) -> dict[str, Any]:
        which = [f"{k.rsplit(':', 1)[0]}: {v}" for k, v in errors.items() if k.endswith(f":{name}") or k.endswith(":faces")]
        return {"skipped": f"failed on {len(which)} sample(s): " + "; ".join(which[:3])}

    if "fid" in cfg.metrics and "fid" not in metrics:
        if "fid" in failed:
            metrics["fid"] = fail("fid")
        else:
            g, r = np.concatenate(fid_feats["generated"]), np.concatenate(fid_feats["ground_truth"])
            metrics["fid"] = {"value": frechet_distance_between(g, r), "generated_frames": len(g), "real_frames": len(r),
                              "features": "torch-fidelity InceptionV3 (TF FID graph), pool3 2048-d",
                              "weights": engines.fid.info.to_dict()}
    if "fvd" in cfg.metrics and "fvd" not in metrics:
        g = np.concatenate(fvd_feats["generated"]) if fvd_feats["generated"] else np.zeros((0, 400))
        r = np.concatenate(fvd_feats["ground_truth"]) if fvd_feats["ground_truth"] else np.zeros((0, 400))
        if "fvd" in failed:
            metrics["fvd"] = fail("fvd")
        elif len(g) < 2 or len(r) < 2:
            metrics["fvd"] = {"skipped": f"{len(g)} clips of {cfg.fvd_clip_frames} frames; FVD needs at least 2"}
        else:
            metrics["fvd"] = {"value": frechet_distance_between(g, r), "clips": len(g),
                              "protocol": f"{cfg.fvd_clip_frames}-frame clips, stride {cfg.fvd_stride}, "
                                          f"{cfg.fvd_resolution}x{cfg.fvd_resolution}, [-1, 1], I3D logits averaged over time",
                              "weights": engines.fvd.info.to_dict()}
    if "syncnet" in cfg.metrics and "syncnet" not in metrics:
        rows = [r["syncnet"] for r in per_sample.values() if "syncnet" in r]
        if "syncnet" in failed or not rows:
            metrics["syncnet"] = fail("syncnet")
        else:
            metrics["syncnet"] = {
                which: {"lse_c": _mean([r[which]["lse_c"] for r in rows]), "lse_d": _mean([r[which]["lse_d"] for r in rows])}
                for which in ("generated", "ground_truth")}
            metrics["syncnet"].update(videos=len(rows), max_offset=cfg.sync_max_offset, weights=engines.syncnet.info.to_dict())
    if "sync_offline" in cfg.metrics and "sync_offline" not in metrics:
        rows = [r["sync_offline"] for r in per_sample.values() if "sync_offline" in r]
        if "sync_offline" in failed or not rows:
            metrics["sync_offline"] = fail("sync_offline")
        else:
            metrics["sync_offline"] = {which: {"confidence": _mean([r[which]["confidence"] for r in rows])}
                                       for which in ("generated", "ground_truth")}
            metrics["sync_offline"].update(videos=len(rows), backend=engines.sync_offline.label, weights=None,
                                           landmarks=engines.faces.landmark_weights.to_dict())
    if "fsim" in cfg.metrics and "fsim" not in metrics:
        rows = [r["fsim"] for r in per_sample.values() if "fsim" in r]
        if "fsim" in failed or not rows:
            metrics["fsim"] = fail("fsim")
        else:
            metrics["fsim"] = {
                "generated": {"value": _mean([r["generated"] for r in rows])},
                "ground_truth": {"value": _mean([r["ground_truth"] for r in rows])},
                "videos": len(rows), "embedding": engines.faces.identity_label,
                "unit": "100 x mean cosine similarity to the reference face",
                "face_fallback_frames": {w: int(sum(r.get("face_fallback_frames", {}).get(w, 0) for r in per_sample.values()))
                                         for w in ("generated", "ground_truth")},
                "weights": [w.to_dict() for w in engines.faces.identity_weights]}
    if "efid" in cfg.metrics and "efid" not in metrics:
        if "efid" in failed or not expr_feats["generated"]:
            metrics["efid"] = fail("efid")
        else:
            g, r = np.concatenate(expr_feats["generated"]), np.concatenate(expr_feats["ground_truth"])
            if len(g) < 2:
                metrics["efid"] = {"skipped": "fewer than 2 frames with expression features"}
            else:
                metrics["efid"] = {"value": frechet_distance_between(g, r), "frames": len(g),
                                   "extractor": engines.expression.name, "label": engines.expression.label,
                                   "weights": [w.to_dict() for w in engines.expression.weights]
                                   + [engines.faces.landmark_weights.to_dict()]}
    return {
        "format_version": FORMAT_VERSION,
        "gen_dir": os.path.abspath(gen_dir),
        "shards": [os.path.abspath(s) if "://" not in s else s for s in list_shards(shards)],
        "samples": len(records),
        "frames": frames_total,
        "sizes": [{"generated": g, "ground_truth": r, "compared_at": c} for g, r, c in sorted(sizes)],
        "config": cfg.to_dict(),
        "metrics": metrics,
        "per_sample": per_sample,
        "errors": errors,
        "seconds": round(time.perf_counter() - t_start, 2),
    }


def _fmt(value: Optional[float], digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}"


def _weights_note(entry: dict[str, Any]) -> str:
    w = entry.get("weights")
    if isinstance(w, dict):
        return f"{os.path.basename(w['path'])} sha256:{w['sha256'][:8]}"
    if isinstance(w, list) and w:
        return ", ".join(f"{os.path.basename(x['path'])} sha256:{x['sha256'][:8]}" for x in w)
    if "backend" in entry:
        return "no weights"
    return ""


def format_table(result: dict[str, Any]) -> str:
    """The printed table: one row per figure, generated and ground-truth columns, weights used."""
    rows = [("metric", "generated", "ground truth", "weights / notes")]
    metrics = result["metrics"]
    for name, field, label in METRIC_ROWS:
        if name not in metrics:
            continue
        entry = metrics[name]
        if "skipped" in entry:
            if field in ("value", "lse_c", "confidence"):
                rows.append((label, "skipped", "", entry["skipped"]))
            continue
        if name in ("fid", "fvd"):
            rows.append((label, _fmt(entry["value"]), "–", _weights_note(entry)))
        elif name == "efid":
            note = _weights_note(entry) if entry["extractor"] != "landmarks" else "landmark descriptor, NOT the paper's 3DMM E-FID"
            rows.append((f"{label} ({entry['extractor']})", _fmt(entry["value"], 4), "–", note))
        elif name == "fsim":
            rows.append((f"{label} ({entry['embedding'].split()[0]})", _fmt(entry["generated"]["value"], 2),
                         _fmt(entry["ground_truth"]["value"], 2), _weights_note(entry)))
        else:
            rows.append((label, _fmt(entry["generated"][field]), _fmt(entry["ground_truth"][field]), _weights_note(entry)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{result['samples']} samples, {result['frames']} frames"
             + "".join(f"; generated {s['generated']}px vs ground truth {s['ground_truth']}px, FID/FVD at {s['compared_at']}px"
                       for s in result["sizes"])]
    for r in rows:
        lines.append(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip())
    if result.get("errors"):
        lines.append(f"{len(result['errors'])} metric error(s) on single samples: see 'errors' in the JSON")
    return "\n".join(lines)
