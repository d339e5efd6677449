"""Ray executor: the stages of ``emo_data`` as a streaming Ray Data graph, one operator per stage.

Wiring (docs/ray.md has the measurements)::

    ray.data.from_items(unfinished sources, longest first, one block each)
      .map_batches(Analyse)        actor pool: probe, audio decode (16 kHz), speech activity / diarization
      .map_batches(VideoPass)      actor pool: the single streaming pass over the frames (scene cuts, face
                                   backend, clip selection, crop, mp4); a generator, so each clip leaves
                                   the actor as soon as it is cut
      .map_batches(head_pose)      CPU tasks: pose -> rotation speed -> speed buckets
      .map_batches(AudioFeatures)  actor pool: wav2vec hidden states per frame (a GPU each when the cluster has GPUs)
      .map_batches(write_samples)  CPU tasks: sample assembly, one staged part file per clip
      -> the driver: a ledger per source; once every clip of a source is written it seals the source
    finalize_corpus(...)           identity clusters -> identity-disjoint split -> final shards

Every model is loaded once per actor (``__init__``), never per item. Rows between operators are
``{"source_id", "kind", "item"}``: ``item`` is a typed stage object (``ClipInFlight``, the
source's ``analysed`` audio and speech, its ``end`` summary, or a ``failed`` row). Blocks are kept
small (``DataContext.target_max_block_size``) so a clip is one block: memory in flight is a few
clips per operator, bounded by Ray Data's backpressure, whatever a video's length; a source's
audio track (64 KB/s) is the only per-source object.

Staging and resume: the write tasks put each clip in ``staging/<source>/<key>.tar`` (temporary
name, fsync, rename). The driver seals a source (rows, then the ``.done`` marker) only when its
``end`` row and every clip key it lists have come back, so a marker always means "all parts are
on disk", and holds the source's fingerprint (what it was made from). A re-run skips sealed
sources whose fingerprint still matches and redoes the others from scratch (emo_data/resume.py,
shared with the in-process executor).

Fault isolation:

- an exception or :class:`StageError` in any operator becomes a ``failed`` row naming the source
  and the stage; the driver seals that source as failed (no samples) and the build goes on;
- a worker *process* death (segfault or ``os._exit`` in a native library, OOM kill) kills the
  actor: Ray restarts it (``max_restarts``) and retries the call (``max_task_retries``); once
  spent, Ray Data drops that block (``max_errored_blocks = -1``) and goes on. Sources still unsealed
  after a round run again in a new round (``source_retries``), once the finished round's actors
  have given their CPUs back (an embedded Ray that still holds them is restarted); whatever is
  unsealed then is sealed by the driver with reason ``worker_crash``, stage ``worker``;
- a stall watchdog: a round that delivers no row for ``ExecutorConfig.stall_timeout_s`` ends the
  build; every source not sealed by then becomes a failed row with reason ``stalled``.

Fault injection (tests only): ``ExecutorConfig.crash_on_source`` or the environment variable
``EMO_FAULT_CRASH_SOURCE`` (read by the driver) is ``<source_id>[,after=<n>][,times=<k>,state=<dir>]``:
the video-pass worker calls ``os._exit(1)`` on that source (after yielding ``n`` clips; only the
first ``k`` times, counted by files in ``dir``), to exercise the crash paths;
``EMO_FAULT_STALL_SOURCE=<source_id>:<s>`` makes it sleep after each clip of that source, so a test
can kill a build while a source is half staged, or trip the watchdog.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Optional

from emo_data.config import BuildConfig, ExecutorConfig, StageResources
from emo_data.finalize import finalize_corpus
from emo_data.manifest import ManifestRow
from emo_data.staging import clear_source, is_done, seal_source, staging_dir
from emo_data.types import Source

from .local import BuildResult, prepare_sources

log = logging.getLogger("emo.build.ray")

FAULT_ENV = "EMO_FAULT_CRASH_SOURCE"
STALL_ENV = "EMO_FAULT_STALL_SOURCE"   # "<source_id>:<seconds>": the video worker sleeps after each clip of it
# Environment passed on to the worker processes (matters on a cluster, where workers do not
# inherit the driver's environment).
_FORWARD_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE", "TORCH_HOME", "EMO_SAMPLES_DIR", "RAY_AUTH_MODE",
                "HF_TOKEN", "PYANNOTE_TOKEN")
# One clip (mp4 + audio + arrays, ~1-4 MB) per block, so clips stream one by one.
_BLOCK_BYTES = 256 * 1024

ANALYSED, CLIP, END, FAILED, WRITTEN = "analysed", "clip", "end", "failed", "written"
GATED = "gated"   # a clip the per-clip gate (lip sync, frozen face, quality) rejected: its row


def _rows(rows: list[tuple[str, str, Any]]) -> dict[str, list]:
    return {"source_id": [r[0] for r in rows], "kind": [r[1] for r in rows], "item": [r[2] for r in rows]}


def _assigned_gpu() -> bool:
    """Did Ray give this actor a GPU? (num_gpus > 0 in its operator's resources)"""
    try:
        import ray

        return bool(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001 - no Ray context: stay on the configured device
        return False


def _worker_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


# ------------------------------------------------------------------------------------------ operators
class Analyse:
    """Actor: probe, audio decode, vocal separation and speech activity (the separator and the
    speech model load once per actor, on the GPU Ray assigned it, if any)."""

    def __init__(self, config_dict: dict):
        from emo_data.analysis import SourceAnalysisStage

        _worker_logging()
        config = BuildConfig.from_dict(config_dict)
        gpu = _assigned_gpu()
        if gpu:
            config.vocals.device = "cuda"
        self.analyse = SourceAnalysisStage(config)
        self.analyse.ensure_setup()
        if gpu:
            self.analyse.speech.to("cuda")  # diarization on the GPU Ray gave this actor

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from emo_data.analysis import SourceAnalysisError
        from emo_data.clip_work import failed_row

        out = []
        for payload in batch["source"]:
            source = Source(**json.loads(str(payload)))
            try:
                out.append((source.source_id, ANALYSED, self.analyse(source)))
            except SourceAnalysisError as exc:
                failure = failed_row(source, exc.stage, exc.cause)
                out.append((source.source_id, END, {"keys": [], "rows": [], "summary": {"duration_s": exc.duration_s}, "failure": failure}))
        return _rows(out)


class VideoPass:
    """Actor: the single streaming pass over a source's frames (the face backend loads once per
    actor). Yields each clip as soon as it is cut, then the source's ``end`` row."""

    def __init__(self, config_dict: dict, crash_on_source: Optional[str] = None, stall: Optional[str] = None):
        from emo_data.clips import VideoPassStage

        _worker_logging()
        self.config = BuildConfig.from_dict(config_dict)
        self.crash = _CrashFault.parse(crash_on_source)
        self.stall_source, _, seconds = (stall or "").rpartition(":")
        self.stall_s = float(seconds or 0)
        self.video = VideoPassStage(self.config)
        self.video.ensure_setup()

    def __call__(self, batch: dict[str, Any]) -> Iterator[dict[str, list]]:
        for source_id, kind, item in zip(batch["source_id"], batch["kind"], batch["item"]):
            if kind != ANALYSED:
                yield _rows([(source_id, kind, item)])
                continue
            yield from self._one(item)

    def _one(self, analysed) -> Iterator[dict[str, list]]:
        """``analysed``: an :class:`emo_data.analysis.AnalysedSource`."""
        from emo_data.clip_work import ClipInFlight, failed_row, rejected_row
        from emo_data.clips import VideoPassInput, VideoPassSummary
        from emo_data.types import ClipCandidate, RejectedSpan

        source: Source = analysed.source
        if self.crash is not None:
            self.crash.maybe_crash(source.source_id, clips_out=0)
        keys: list[str] = []
        rejected: list[dict] = []
        summary: dict[str, Any] = {"duration_s": analysed.probe.duration_s}
        failure = None
        try:
            inp = VideoPassInput(source, analysed.probe, analysed.audio, analysed.speech, vocals=analysed.vocals, vocals_info=analysed.vocals_info)
            for item in self.video(inp):
                if isinstance(item, ClipCandidate):
                    keys.append(item.key)
                    yield _rows([(source.source_id, CLIP, ClipInFlight(item))])
                    if self.crash is not None:
                        self.crash.maybe_crash(source.source_id, clips_out=len(keys))
                    if self.stall_s and source.source_id == self.stall_source:
                        time.sleep(self.stall_s)  # FAULT INJECTION: a source that is slow to finish
                elif isinstance(item, RejectedSpan):
                    rejected.append(rejected_row(source, item))
                elif isinstance(item, VideoPassSummary):
                    summary.update(item.totals())
        except Exception as exc:  # noqa: BLE001 - errors are rows
            failure = failed_row(source, "video_pass", exc)
        yield _rows([(source.source_id, END, {"keys": keys, "rows": rejected, "summary": summary, "failure": failure})])


@dataclass
class _CrashFault:
    """FAULT INJECTION (tests only): ``<source_id>[,after=<n>][,times=<k>,state=<dir>]``."""

    source_id: str
    after_clips: int = 0
    times: Optional[int] = None
    state_dir: Optional[str] = None

    @classmethod
    def parse(cls, spec: Optional[str]) -> Optional["_CrashFault"]:
        if not spec:
            return None
        source_id, *options = spec.split(",")
        values = dict(o.split("=", 1) for o in options)
        return cls(source_id, int(values.get("after", 0)), int(values["times"]) if "times" in values else None,
                   values.get("state"))

    def maybe_crash(self, source_id: str, clips_out: int) -> None:
        if source_id != self.source_id or clips_out != self.after_clips:
            return
        if self.times is not None and self.state_dir:
            os.makedirs(self.state_dir, exist_ok=True)
            if len(os.listdir(self.state_dir)) >= self.times:
                return
            with open(os.path.join(self.state_dir, f"crash-{os.getpid()}-{time.time_ns()}"), "w"):
                pass
        os._exit(1)  # simulates a segfault in a native library


def _per_clip(batch: dict[str, Any], stage_name: str, fn) -> dict[str, list]:
    """Apply ``fn`` to the clips of a batch; pass other rows through; an error is a ``failed`` row."""
    from emo_data.clip_work import failed_row

    out = []
    for source_id, kind, item in zip(batch["source_id"], batch["kind"], batch["item"]):
        if kind != CLIP:
            out.append((source_id, kind, item))
            continue
        try:
            out.append((source_id,) + fn(item))
        except Exception as exc:  # noqa: BLE001 - errors are rows
            out.append((source_id, FAILED, {"key": item.key, "row": failed_row(item.clip.source, stage_name, exc)}))
    return _rows(out)


class SyncGate:
    """Actor: the per-clip lip-sync / frozen-face / quality gate (SyncNet weights load once per
    actor, on the GPU Ray assigned it, if any). A rejected clip leaves as a ``gated`` row."""

    def __init__(self, config_dict: dict):
        from emo_data.sync.gate import SyncGateStage

        _worker_logging()
        self.stage = SyncGateStage.from_build_config(BuildConfig.from_dict(config_dict))
        if _assigned_gpu():
            self.stage.to("cuda")
        self.stage.ensure_setup()

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from emo_data.clip_work import apply_sync_gate, gate_rejected_row

        def gate(item):
            apply_sync_gate(item, self.stage)
            if item.rejected is not None:
                return GATED, {"key": item.key, "row": gate_rejected_row(item)}
            return CLIP, item

        return _per_clip(batch, "sync_gate", gate)


def head_pose(batch: dict[str, Any], config_dict: dict) -> dict[str, list]:
    """CPU task: head pose -> rotation speed -> speed buckets for each clip of the batch."""
    from emo_data.clip_work import add_head_motion
    from emo_data.pose import HeadPoseStage

    config = BuildConfig.from_dict(config_dict)
    stage = HeadPoseStage(config.speed)
    return _per_clip(batch, "head_pose", lambda item: (CLIP, add_head_motion(item, stage, config.clip.crop_size)))


class AudioFeatures:
    """Actor: wav2vec hidden states per frame (the encoder loads once per actor; on the GPU Ray
    assigned it, if any). Clips of different lengths run one by one: padding them into one batch
    would change the features (wav2vec2-base normalises over time)."""

    def __init__(self, config_dict: dict):
        from emo_data.audio_features import AudioFeatureStage

        _worker_logging()
        config = BuildConfig.from_dict(config_dict)
        feature_config = config.audio_features
        if _assigned_gpu():
            feature_config.device = "cuda"
        self.stage = AudioFeatureStage(feature_config)
        self.stage.ensure_setup()

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from emo_data.clip_work import add_audio_features

        return _per_clip(batch, "audio_features", lambda item: (CLIP, add_audio_features(item, self.stage)))


def write_samples(batch: dict[str, Any], config_dict: dict, out_dir: str) -> dict[str, list]:
    """CPU task: assemble each clip's sample and write it as a staged part file."""
    from emo_data.clip_work import assemble_sample, clip_row
    from emo_data.samples import SampleAssemblyStage
    from emo_data.staging import write_staged_sample

    config = BuildConfig.from_dict(config_dict)
    assemble = SampleAssemblyStage(config)

    def write(item):
        sample = assemble_sample(item, assemble, config)
        write_staged_sample(out_dir, item.clip.source.source_id, sample, config_dict)
        return WRITTEN, {"key": item.key, "row": clip_row(item.clip, sample)}

    return _per_clip(batch, "write", write)


# ------------------------------------------------------------------------------------------ driver side
@dataclass
class _SourceState:
    source: Source
    end: Optional[dict[str, Any]] = None
    written: dict[str, dict] = field(default_factory=dict)   # key -> clip manifest row
    failures: dict[str, dict] = field(default_factory=dict)  # key -> failed row
    gated: dict[str, dict] = field(default_factory=dict)     # key -> rejected row (per-clip gate)


class _Ledger:
    """Driver bookkeeping: collects each source's rows and seals it once all its clips are back."""

    def __init__(self, sources: list[Source], out_dir: str, fingerprints: Optional[dict[str, dict]] = None):
        self.out_dir = out_dir
        self.fingerprints = fingerprints or {}   # source_id -> what the source is made from (emo_data.resume)
        self.state = {s.source_id: _SourceState(s) for s in sources}
        self.sealed: list[tuple[str, str, dict[str, Any]]] = []  # (source_id, status, summary)

    def restart(self, source_ids: Iterable[str]) -> None:
        """Forget what came back for these sources (a new round redoes them from scratch)."""
        for source_id in source_ids:
            self.state[source_id] = _SourceState(self.state[source_id].source)

    def add(self, source_id: str, kind: str, item: Any) -> Optional[tuple[str, dict[str, Any]]]:
        """Record one output row; returns (status, summary) when this row completed its source."""
        st = self.state.get(source_id)
        if st is None or is_done(self.out_dir, source_id):
            return None  # a retried block repeating a sealed source
        if kind == END:
            st.end = item
        elif kind == WRITTEN:
            st.written[item["key"]] = item["row"]
        elif kind == FAILED:
            st.failures[item["key"]] = item["row"]
        elif kind == GATED:
            st.gated[item["key"]] = item["row"]
        if st.end is None or not set(st.end["keys"]) <= set(st.written) | set(st.failures) | set(st.gated):
            return None
        from emo_data.clip_work import order_rows, staged_totals

        end = st.end
        failure = end["failure"] or next((st.failures[k] for k in end["keys"] if k in st.failures), None)
        if failure is not None:
            summary = {"duration_s": end["summary"].get("duration_s", 0.0)}
            seal_source(self.out_dir, source_id, [failure], summary, "failed", self.fingerprints.get(source_id))
            status = "failed"
        else:
            rows = order_rows([st.written[k] for k in end["keys"] if k in st.written]
                              + [st.gated[k] for k in end["keys"] if k in st.gated] + list(end["rows"]))
            summary = {**end["summary"], **staged_totals(rows)}   # what the per-clip gates kept
            seal_source(self.out_dir, source_id, rows, summary, "ok", self.fingerprints.get(source_id))
            status = "ok"
        self.sealed.append((source_id, status, summary))
        return status, summary


class _SealProgress:
    """What the user sees of sealed sources: a tqdm bar, or (while Ray Data's per-stage display is
    live on a terminal) one printed line per sealed source."""

    def __init__(self, total: int, enabled: bool, stage_bars: bool):
        from tqdm import tqdm

        self.total, self.done, self.enabled, self.lines = total, 0, enabled, stage_bars
        self._bar = None if (stage_bars or not enabled) else tqdm(total=total, unit="video", desc="sources sealed", dynamic_ncols=True)

    def sealed(self, source_id: str, status: str, summary: dict[str, Any], totals: dict[str, float]) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix(clips=int(totals["clips"]), kept=f"{totals['kept_s']:.0f}s", failed=int(totals["failed"]))
            self._bar.update(1)
        elif self.enabled:
            clips = int(summary.get("clips", 0))
            what = f"{clips} clip{'' if clips == 1 else 's'}, {summary.get('kept_s', 0.0):.1f} s kept" if status == "ok" else "failed (see manifest)"
            print(f"sealed {self.done}/{self.total} {source_id}: {what}  (total {int(totals['clips'])} clips, "
                  f"{totals['kept_s']:.0f} s kept, {int(totals['failed'])} failed)", file=sys.stderr, flush=True)

    def __enter__(self) -> "_SealProgress":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()


def _cost(path: str, probe: bool) -> float:
    """Rough work estimate for longest-first ordering: seconds x sqrt(pixels / 512^2) from the
    container header (decode cost grows with resolution), else the file size."""
    if probe and "://" not in path:
        try:
            import av

            with av.open(path) as c:
                v = c.streams.video[0]
                seconds = float(c.duration or 0) / 1e6
                return seconds * max(1.0, (v.codec_context.width * v.codec_context.height) / 512.0 ** 2) ** 0.5 * 1e9
        except Exception:  # noqa: BLE001 - ordering only; the probe stage reports bad files
            pass
    try:
        return float(os.path.getsize(path))
    except OSError:
        return 0.0


def _start_ray(address: Optional[str], workers: Optional[int], executor: ExecutorConfig,
               extra_env: Optional[dict[str, str]] = None) -> bool:
    """Connect to (or start) Ray; returns True if this call started it (and must shut it down).
    ``extra_env`` goes to every worker (a token given in the config: it is never stored)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return False
    verbose = log.isEnabledFor(logging.INFO)
    if not verbose:
        # A user watching the progress bars does not need Ray Data's notices; `emo-data -v` shows them.
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    env = {k: os.environ[k] for k in _FORWARD_ENV if k in os.environ}
    env.update(extra_env or {})
    runtime_env = {"env_vars": env} if env else None
    if address:
        _check_reachable(address)
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING, log_to_driver=verbose)
    else:
        ray.init(
            address="local",  # always a new embedded instance, never a `ray start` cluster found on this machine
            num_cpus=int(workers or os.cpu_count() or 1),
            object_store_memory=executor.object_store_memory,
            include_dashboard=False,
            runtime_env=runtime_env,
            # Ray runs workers at nice 15; the in-process executor runs at 0, and on a shared
            # machine nice-15 workers lose most of the CPU to anyone else's work.
            _system_config={
                "worker_niceness": executor.worker_niceness,
                # Keep idle task workers: by default Ray kills idle workers beyond one per CPU, and
                # with the actor pools holding those slots every per-clip task then paid for a new
                # Python worker (measured: a third of both cores went to worker start-up).
                "num_workers_soft_limit": executor.idle_workers or 4 * int(workers or os.cpu_count() or 1) + 4,
            },
            logging_level=logging.WARNING,
            # Worker processes' stdout/stderr (library deprecation warnings and the like) reach the
            # terminal only with -v; failures reach the manifest as rows either way.
            log_to_driver=verbose,
        )
    return True


# Ray's C++ components log to the driver's stderr in this form, e.g. core_worker.cc's "Actor ...
# has constructor arguments in the object store and max_restarts > 0" for every Ray Data actor.
_RAY_NATIVE_LOG = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] \S+\.(?:cc|h):\d+:")


# Notices Ray's Python side prints to the driver's stderr: a worker's death seen by the raylet
# (handled: the source is retried or becomes a row), worker output lines.
_RAY_PY_NOTICE = re.compile(r"^(?:\x1b\[[\d;]*m)?\((?:raylet[^)\n]*\)|[^\n]*?pid=\d+[^\n]*?\))")


class _NoticeFilter:
    """A text stream for ``sys.stderr`` that drops whole lines of Ray's internal notices and
    passes everything else (progress bars redraw with ``\r`` and pass at once)."""

    def __init__(self, stream):
        self._stream, self._pending = stream, ""

    def write(self, text: str) -> int:
        self._pending += text
        while "\n" in self._pending:
            line, self._pending = self._pending.split("\n", 1)
            if not (_RAY_PY_NOTICE.match(line) or _RAY_NATIVE_LOG.match(line.encode("utf-8", "replace"))):
                self._stream.write(line + "\n")
        if "\r" in self._pending and not self._pending.lstrip("\r").startswith(("(", "\x1b[33m(", "\x1b[36m(")):
            self._stream.write(self._pending)
            self._pending = ""
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def drain(self) -> None:
        """Pass on a last line without its newline (the stream stays open)."""
        if self._pending:
            self._stream.write(self._pending)
            self._pending = ""
        self._stream.flush()

    def close(self) -> None:
        self.drain()
        self._stream.close()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...
        return getattr(self._stream, name)


@contextlib.contextmanager
def _native_logs_hidden(active: bool):
    """While active, file descriptor 2 goes to a temporary file (where Ray's C++ code and the log
    handlers Ray set up at import write) and Python's ``sys.stderr`` to the real terminal through
    :class:`_NoticeFilter`, so progress and this package's messages show and Ray's internal
    notices do not. What Ray wrote is dropped: it is all in Ray's session logs
    (``/tmp/ray/session_latest/logs``), and ``emo-data -v`` shows it live. Ray Data's warnings
    and errors about blocks it drops are silenced too: the build retries those sources or makes
    them rows."""
    if not active:
        yield
        return
    sys.stderr.flush()
    saved_fd = os.dup(2)
    captured = tempfile.TemporaryFile()
    os.dup2(captured.fileno(), 2)
    old_stderr, old_stdout = sys.stderr, sys.stdout
    sys.stderr = _NoticeFilter(open(os.dup(saved_fd), "w", buffering=1,
                                    encoding=getattr(old_stderr, "encoding", None) or "utf-8", errors="backslashreplace"))
    sys.stdout = _NoticeFilter(old_stdout)  # Ray prints the raylet's notices (a worker died, ...) to stdout
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    moved = []
    for handler in logging.root.handlers + logging.getLogger("emo").handlers:
        if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is old_stderr:
            handler.setStream(sys.stderr)
            moved.append(handler)
    try:
        yield
    finally:
        sys.stderr.flush()
        for handler in moved:
            handler.setStream(old_stderr)
        sys.stderr.close()
        sys.stderr = old_stderr
        sys.stdout.drain()
        sys.stdout = old_stdout
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        captured.close()


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast on a ``host:port`` GCS address nobody listens on (ray.init would wait minutes)."""
    import socket

    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"cannot reach a Ray head at {address} ({exc}); start one with `ray start --head --port=...`") from exc


@dataclass
class _Plan:
    """Resolved resources per operator for this cluster."""

    video_actors: int
    analyse_actors: int
    feature_actors: int
    task_concurrency: int
    feature_gpus: float
    analyse_gpus: float
    gate_actors: int = 1
    gate_gpus: float = 0.0
    gate_wanted: bool = True


def _plan(config: BuildConfig, executor: ExecutorConfig, sources: int, cpus: float, gpus: float) -> _Plan:
    """Actors per pool for a cluster with ``cpus`` / ``gpus``. Every pool needs at least one
    actor at once (Ray Data starts them up front), so the reservations must fit together: video
    actors are cut down to fit, and a configuration that cannot fit at all is an error now
    rather than a build that waits forever for resources."""
    def gpus_for(stage: StageResources, uses_model: bool) -> float:
        if stage.num_gpus is not None:
            return float(stage.num_gpus)
        return 1.0 if uses_model and gpus > 0 else 0.0

    feature_gpus = gpus_for(executor.audio_features, config.audio_features.enabled)
    separates = config.vocals.mode != "never" and bool(config.vocals.weights)
    analyse_gpus = gpus_for(executor.analyse, config.speech.backend == "pyannote" or separates)
    video = executor.workers or max(1, int(cpus // max(executor.video.num_cpus, 1e-3)))
    video = max(1, min(executor.video.concurrency or video, sources))
    # Light stages: a quarter (speech) or half (wav2vec on CPU) as many actors as video passes
    # (one wav2vec actor kept up with two video passes in bench/build_scaling.py); one per GPU
    # when they run on GPUs.
    features = executor.audio_features.concurrency or (max(1, int(gpus // feature_gpus)) if feature_gpus else max(1, video // 2))
    analyse = min(executor.analyse.concurrency or (max(1, int(gpus // analyse_gpus)) if analyse_gpus else max(1, video // 4)), sources)
    if not config.audio_features.enabled:
        features = 0
    # The per-clip gate: the weight-free scorer is light; SyncNet takes a GPU each when there are GPUs.
    from emo_data.sync.gate import SyncGateStage

    gate_wanted = SyncGateStage.wanted(config)
    gate_gpus = gpus_for(executor.sync_gate, config.sync.enabled and config.sync.backend_name == "syncnet") if gate_wanted else 0.0
    gate = 0 if not gate_wanted else (
        executor.sync_gate.concurrency or (max(1, int(gpus // gate_gpus)) if gate_gpus else max(1, video // 2)))

    def cpus_needed(v: int) -> float:
        return (v * executor.video.num_cpus + analyse * executor.analyse.num_cpus
                + features * executor.audio_features.num_cpus + gate * executor.sync_gate.num_cpus)

    while video > 1 and cpus_needed(video) > cpus + 1e-6:
        video -= 1
    gpus_needed = (features * feature_gpus + analyse * analyse_gpus + gate * gate_gpus
                   + video * (executor.video.num_gpus or 0.0))
    if cpus_needed(video) > cpus + 1e-6 or gpus_needed > gpus + 1e-6:
        raise RuntimeError(
            f"the stage resources do not fit the cluster: {video} video-pass, {analyse} analyse, {gate} sync-gate and "
            f"{features} audio-feature actors need {cpus_needed(video):g} CPUs and {gpus_needed:g} GPUs, "
            f"the cluster has {cpus:g} CPUs and {gpus:g} GPUs; lower num_cpus / num_gpus / concurrency "
            "in --executor-config (see docs/ray.md)")
    return _Plan(video_actors=video, analyse_actors=analyse, feature_actors=max(features, 1),
                 task_concurrency=max(1, video), feature_gpus=feature_gpus, analyse_gpus=analyse_gpus,
                 gate_actors=max(gate, 1), gate_gpus=gate_gpus, gate_wanted=gate_wanted)


def _graph(sources: list[Source], config: BuildConfig, executor: ExecutorConfig, out_dir: str, plan: _Plan):
    import ray.data

    config_dict = config.to_dict()
    items = [{"source": json.dumps(asdict(s))} for s in sources]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    actor_args = dict(max_restarts=executor.max_restarts, max_task_retries=executor.max_task_retries)
    ds = ds.map_batches(
        Analyse, fn_constructor_kwargs={"config_dict": config_dict}, batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=plan.analyse_actors, max_tasks_in_flight_per_actor=1),
        num_cpus=executor.analyse.num_cpus, num_gpus=plan.analyse_gpus, **actor_args,
    )
    ds = ds.map_batches(
        VideoPass, fn_constructor_kwargs={"config_dict": config_dict, "crash_on_source": executor.crash_on_source,
                                          "stall": os.environ.get(STALL_ENV)},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=plan.video_actors, max_tasks_in_flight_per_actor=1),
        num_cpus=executor.video.num_cpus, num_gpus=executor.video.num_gpus or 0.0, **actor_args,
    )
    if plan.gate_wanted:
        ds = ds.map_batches(
            SyncGate, fn_constructor_kwargs={"config_dict": config_dict}, batch_size=executor.sync_gate.batch_size,
            compute=ray.data.ActorPoolStrategy(size=plan.gate_actors, max_tasks_in_flight_per_actor=1),
            num_cpus=executor.sync_gate.num_cpus, num_gpus=plan.gate_gpus, **actor_args,
        )
    ds = ds.map_batches(
        head_pose, fn_kwargs={"config_dict": config_dict}, batch_size=executor.head_pose.batch_size,
        num_cpus=executor.head_pose.num_cpus,
        compute=ray.data.TaskPoolStrategy(size=executor.head_pose.concurrency or plan.task_concurrency),
    )
    if config.audio_features.enabled:
        ds = ds.map_batches(
            AudioFeatures, fn_constructor_kwargs={"config_dict": config_dict},
            batch_size=executor.audio_features.batch_size,
            compute=ray.data.ActorPoolStrategy(size=plan.feature_actors, max_tasks_in_flight_per_actor=1),
            num_cpus=executor.audio_features.num_cpus, num_gpus=plan.feature_gpus, **actor_args,
        )
    ds = ds.map_batches(
        write_samples, fn_kwargs={"config_dict": config_dict, "out_dir": out_dir},
        batch_size=executor.write.batch_size, num_cpus=executor.write.num_cpus,
        compute=ray.data.TaskPoolStrategy(size=executor.write.concurrency or plan.task_concurrency),
    )
    return ds


def _run_round(sources: list[Source], out_dir: str, config: BuildConfig, executor: ExecutorConfig, plan: _Plan,
               ledger: _Ledger, bar, stage_bars: bool, totals: dict[str, float], timeline: list[dict], t0: float) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.max_errored_blocks = -1                     # a crashed source drops its blocks, not the build
    ctx.target_max_block_size = _BLOCK_BYTES        # one clip per block: clips stream one by one
    ctx.enable_fallback_to_arrow_object_ext_type = True  # stage objects travel as Python objects
    ctx.enable_progress_bars = stage_bars           # Ray Data's live bar per operator (= per stage)
    ctx.enable_operator_progress_bars = stage_bars
    ctx.enable_rich_progress_bars = True           # compact: one table row per operator
    ctx.use_ray_tqdm = False
    ctx.print_on_execution_start = False
    if not log.isEnabledFor(logging.INFO):
        # "bars disabled" and "execution finished" notices: Ray Data configures these loggers
        # when it is imported, so quieten them here rather than at start-up.
        for name in ("ray.data._internal.progress", "ray.data._internal.execution.streaming_executor"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # Errors about blocks it drops (an actor that died): the build retries those sources in a
        # new round or seals them as rows, so the traceback is noise; -v shows it.
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    for source in sources:
        clear_source(out_dir, source.source_id)  # parts of an interrupted attempt
    ledger.restart(s.source_id for s in sources)
    with warnings.catch_warnings():
        # max_restarts / max_task_retries only exist as **ray_remote_args in Ray 2.60 (deprecated
        # for removal in 2.64; revisit when upgrading).
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = _graph(sources, config, executor, out_dir, plan)
    rows = _watched(ds.iter_rows(), executor.stall_timeout_s)
    for row in rows:
        done = ledger.add(row["source_id"], row["kind"], row["item"])
        if done is None:
            continue
        status, summary = done
        timeline.append({"source_id": row["source_id"], "sealed_at": round(time.time() - t0, 3),
                         "duration_s": float(summary.get("duration_s", 0.0)), "status": status})
        totals["clips"] += summary.get("clips", 0)
        totals["kept_s"] += summary.get("kept_s", 0.0)
        totals["in_s"] += summary.get("duration_s", 0.0)
        totals["failed"] += status != "ok"
        bar.sealed(row["source_id"], status, summary, totals)
    if rows.stalled:
        return False
    try:  # Ray Data's per-operator timings: where the wall time of this build went
        with open(os.path.join(out_dir, "ray_stats.txt"), "a") as fh:
            fh.write(ds.stats() + "\n")
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        log.info("no Ray Data stats: %s", exc)
    return True


class _watched:
    """Iterate ``rows`` on a helper thread; stop (``stalled = True``) when none arrives for
    ``timeout_s``. The driver can then end the build instead of waiting forever on a pipeline
    that cannot make progress (an actor that hangs, a retry that can never be scheduled)."""

    def __init__(self, rows: Iterable[Any], timeout_s: float, poll_s: float = 1.0):
        self.timeout_s, self.poll_s, self.stalled = timeout_s, poll_s, False
        self._queue: queue.Queue = queue.Queue(maxsize=16)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, args=(iter(rows),), daemon=True, name="emo-rows")
        self._thread.start()

    def _pump(self, rows: Iterator[Any]) -> None:
        try:
            for row in rows:
                while not self._stop.is_set():
                    try:
                        self._queue.put(("row", row), timeout=self.poll_s)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the driver thread
            self._queue.put(("error", exc))

    def __iter__(self) -> Iterator[Any]:
        last = time.monotonic()
        while True:
            try:
                what, payload = self._queue.get(timeout=self.poll_s)
            except queue.Empty:
                if time.monotonic() - last > self.timeout_s:
                    self.stalled = True
                    self._stop.set()
                    return
                continue
            last = time.monotonic()
            if what == "end":
                return
            if what == "error":
                raise payload
            yield payload


def _seal_unfinished(source: Source, out_dir: str, reason: str, detail: str, fingerprint: Optional[dict] = None) -> None:
    row = ManifestRow(
        status="failed", source_id=source.source_id, path=source.path, kind=source.kind, language=source.language,
        licence=source.licence, reason=reason, stage="worker", detail=detail,
    ).to_dict()
    clear_source(out_dir, source.source_id)
    seal_source(out_dir, source.source_id, [row], {"duration_s": 0.0}, "failed", fingerprint)


def _seal_crashed(source: Source, out_dir: str, attempts: int, fingerprint: Optional[dict] = None) -> None:
    _seal_unfinished(source, out_dir, "worker_crash",
                     f"a worker process died while handling this source ({attempts} round(s), each with Ray actor "
                     "restarts/task retries); see the Ray worker logs (e.g. /tmp/ray/session_latest/logs)", fingerprint)


def _release_round(started_embedded: bool, address: Optional[str], executor: ExecutorConfig,
                   extra_env: dict[str, str], wait_s: float = 30.0) -> None:
    """Before a retry round: the finished round's actors must give their CPUs back, or the new
    round's actors can never be scheduled (seen: a dead VideoPass actor's retry round waiting
    forever behind the first round's two live actors). On the embedded Ray, wait for every CPU to
    be free and restart Ray if they are not; on a cluster (other jobs may hold CPUs) go on, and
    the stall watchdog bounds the wait."""
    import gc

    import ray

    gc.collect()  # drop the finished dataset's executor and actor handles
    if not started_embedded:
        return
    deadline = time.monotonic() + wait_s
    total = ray.cluster_resources().get("CPU", 0.0)
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0.0) >= total - 1e-6:
            return
        time.sleep(0.5)
    log.warning("the last round's actors still hold CPUs after %.0f s; restarting the embedded Ray", wait_s)
    ray.shutdown()
    _start_ray(address, executor.workers, executor, extra_env)


def build_corpus_ray(
    sources: Iterable[Source] | str,
    out_dir: str,
    config: Optional[BuildConfig] = None,
    address: Optional[str] = None,
    workers: Optional[int] = None,
    progress: bool = True,
    executor: Optional[ExecutorConfig] = None,
    resplit: bool = False,
) -> BuildResult:
    """Build a corpus with Ray Data: stream every new, unfinished or changed source (see
    emo_data.resume) through the stage graph, then finalise.

    ``address=None`` starts an embedded local Ray with ``workers`` (default: all) CPUs;
    ``"auto"`` / ``"ray://host:10001"`` / ``"host:port"`` join a running cluster, whose workers
    must see ``out_dir`` (a shared filesystem) and have this package installed.
    """
    config = config or BuildConfig()
    executor = executor or ExecutorConfig()
    if workers is not None:
        executor.workers = workers
    if executor.crash_on_source is None and os.environ.get(FAULT_ENV):
        executor.crash_on_source = os.environ[FAULT_ENV]
    out_dir = os.path.abspath(out_dir)
    sources, resume = prepare_sources(sources, out_dir, config, resplit)
    os.makedirs(staging_dir(out_dir), exist_ok=True)
    todo = list(resume.todo)
    # Longest first: the last source to start bounds the wall time on a small pool.
    probe = len(todo) <= 2000  # header probes cost ~10 ms each; huge corpora just go by file size
    todo.sort(key=lambda s: -_cost(s.path, probe))
    # A token given in the config reaches the workers through their environment only: the
    # config they receive (to_dict) never holds it.
    extra_env = {"PYANNOTE_TOKEN": config.speech.pyannote_token} if config.speech.pyannote_token else {}
    start = time.time()
    totals = {"clips": 0.0, "kept_s": 0.0, "in_s": 0.0, "failed": 0.0}
    rounds = 0
    stalled = False
    timeline: list[dict] = []
    plan = None
    if todo:
        verbose = log.isEnabledFor(logging.INFO)
        # On a terminal Ray Data draws a live bar per operator (stage) and sealed sources are
        # printed above it, one line each; elsewhere one tqdm bar counts sealed sources.
        stage_bars = progress and sys.stderr.isatty() and sys.stdout.isatty()
        with _native_logs_hidden(not verbose):
            started = _start_ray(address, executor.workers, executor, extra_env)
            try:
                import ray

                resources = ray.cluster_resources()
                plan = _plan(config, executor, len(todo), resources.get("CPU", 1.0), resources.get("GPU", 0.0))
                ledger = _Ledger(todo, out_dir, resume.fingerprints)
                with _SealProgress(len(todo), progress, stage_bars) as bar:
                    for rounds in range(1, executor.source_retries + 2):
                        remaining = [s for s in todo if not is_done(out_dir, s.source_id)]
                        if not remaining:
                            rounds -= 1
                            break
                        if rounds > 1:
                            log.warning("round %d: %d source(s) unsealed after a worker crash, retrying", rounds, len(remaining))
                            _release_round(started and not address, address, executor, extra_env)
                        if not _run_round(remaining, out_dir, config, executor, plan, ledger, bar, stage_bars, totals,
                                          timeline, start):
                            stalled = True
                            break
                    for source in todo:
                        if is_done(out_dir, source.source_id):
                            continue
                        if stalled:
                            _seal_unfinished(source, out_dir, "stalled",
                                             f"the build delivered no output for {executor.stall_timeout_s:g} s "
                                             "(ExecutorConfig.stall_timeout_s / --stall-timeout) while this source was "
                                             "unfinished; the build was ended", resume.fingerprints.get(source.source_id))
                        else:
                            _seal_crashed(source, out_dir, rounds, resume.fingerprints.get(source.source_id))
                        bar.sealed(source.source_id, "failed", {"duration_s": 0.0}, totals)
            finally:
                if started:
                    import ray

                    ray.shutdown()
        if stalled:
            log.warning("stall watchdog: no progress for %g s; unfinished sources are failed rows (reason stalled)",
                        executor.stall_timeout_s)
    summary = finalize_corpus(out_dir, sources, config, wall_s=time.time() - start if todo else 0.0,
                              processed=[s.source_id for s in todo], resplit=resplit)
    if not summary.unchanged:
        _note_executor(out_dir, {"executor": "ray", "address": address or "embedded", "workers": executor.workers,
                                 "plan": asdict(plan) if plan else None, "executor_config": executor.to_dict(),
                                 "rounds": rounds, "stalled": stalled, "processed": len(todo),
                                 "skipped": len(sources) - len(todo), "sources": timeline})
    return BuildResult(summary=summary, out_dir=out_dir, processed=len(todo), skipped=len(sources) - len(todo), plan=resume)


def _note_executor(out_dir: str, info: dict[str, Any]) -> None:
    path = os.path.join(out_dir, "build.json")
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return
    data["executor"] = info
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, path)
