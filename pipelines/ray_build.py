"""Ray executor: the same per-source stages as ``pipelines.local``, spread over a Ray actor pool.

Wiring (see docs/ray.md for why and for measurements)::

    ray.data.from_items(unfinished sources, one block per source)
      .map_batches(_SourceWorker, batch_size=1,
                   compute=ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1))
      -> one small summary row per source, streamed back to the driver (progress bar)
    finalize_corpus(...)   # identity clusters -> identity-disjoint splits -> final shards

Each ``_SourceWorker`` actor holds one :class:`pipelines.local.SourcePipeline` (probe, audio
decode, speech activity, the streaming video pass with its face backend, head pose, wav2vec,
sample assembly), so every model is loaded once per actor. A source streams through it clip by
clip into ``staging/<source_id>.tar``; only the clip being assembled is in memory, whatever the
video's length. Nothing but a few-number summary row per source goes through the object store.

Fault isolation:

- a Python exception or a :class:`StageError` on one source is caught inside ``SourcePipeline``
  and becomes a ``failed`` manifest row (as in the local executor);
- a worker *process* death (segfault or ``os._exit`` in a native library, OOM kill) kills the
  actor: Ray restarts it (``max_restarts``) and retries the source (``max_task_retries``); once
  those are spent, Ray Data drops that one block (``DataContext.max_errored_blocks = -1``) and the
  dataset goes on. Sources still without a done marker after the round are run again in a new
  round (``source_retries``); whatever is still unfinished then is sealed by the driver with a
  ``failed`` row, reason ``worker_crash``, stage ``worker``.

Resumability is the staging contract: a source with ``staging/<id>.done`` is complete (the
marker is written last) and is skipped; anything else is redone from scratch. Finalisation
rewrites every final shard from staging through a scratch folder, so re-running after a crash or
``kill -9`` gives exactly the keys of an uninterrupted run.

Fault injection (tests only): ``ExecutorConfig.crash_on_source`` or the environment variable
``EMO_FAULT_CRASH_SOURCE`` (read by the driver) names a source_id on which the worker process
calls ``os._exit(1)`` before staging it, to exercise the crash path.
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import asdict
from typing import Any, Iterable, Optional

from emo_data.config import BuildConfig, ExecutorConfig
from emo_data.finalize import finalize_corpus
from emo_data.manifest import ManifestRow, read_sources
from emo_data.staging import SourceStagingWriter, done_marker, is_done, staging_dir
from emo_data.types import Source

from .local import BuildResult

log = logging.getLogger("emo.build.ray")

FAULT_ENV = "EMO_FAULT_CRASH_SOURCE"
# Environment passed on to the worker processes (matters on a cluster, where workers do not
# inherit the driver's environment).
_FORWARD_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE", "TORCH_HOME", "EMO_SAMPLES_DIR", "RAY_AUTH_MODE")


class _SourceWorker:
    """Ray Data actor UDF: one ``SourcePipeline`` per actor, one source per call."""

    def __init__(self, config_dict: dict, out_dir: str, crash_on_source: Optional[str] = None):
        from pipelines.local import SourcePipeline

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        self.out_dir = out_dir
        self.crash_on_source = crash_on_source
        self.pipeline = SourcePipeline(BuildConfig.from_dict(config_dict))
        self.pipeline.setup()  # every model once per actor, before the first source

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in ("source_id", "status", "clips", "kept_s", "duration_s", "start", "wall_s", "pid")}
        for payload in batch["source"]:
            source = Source(**json.loads(str(payload)))
            if self.crash_on_source and source.source_id == self.crash_on_source:
                os._exit(1)  # FAULT INJECTION: simulates a segfault in a native library
            start = time.time()
            summary = self.pipeline.run(source, self.out_dir)
            with open(done_marker(self.out_dir, source.source_id)) as fh:
                status = json.load(fh).get("status", "ok")
            out["source_id"].append(source.source_id)
            out["status"].append(status)
            out["clips"].append(int(summary.get("clips", 0)))
            out["kept_s"].append(float(summary.get("kept_s", 0.0)))
            out["duration_s"].append(float(summary.get("duration_s", 0.0)))
            out["start"].append(start)
            out["wall_s"].append(time.time() - start)
            out["pid"].append(os.getpid())
        return out


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


def _start_ray(address: Optional[str], workers: Optional[int], executor: ExecutorConfig) -> bool:
    """Connect to (or start) Ray; returns True if this call started it (and must shut it down)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return False
    if not log.isEnabledFor(logging.INFO):
        # A user watching the progress bar does not need Ray Data's notices; `emo-data -v` shows them.
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    env = {k: os.environ[k] for k in _FORWARD_ENV if k in os.environ}
    runtime_env = {"env_vars": env} if env else None
    if address:
        _check_reachable(address)
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
    else:
        ray.init(
            address="local",  # always a new embedded instance, never a `ray start` cluster found on this machine
            num_cpus=int(workers or os.cpu_count() or 1),
            object_store_memory=executor.object_store_memory,
            include_dashboard=False,
            runtime_env=runtime_env,
            # Ray runs workers at nice 15; the in-process executor runs at 0, and on a shared
            # machine nice-15 workers lose most of the CPU to anyone else's work.
            _system_config={"worker_niceness": executor.worker_niceness},
            logging_level=logging.WARNING,
        )
    return True


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


def _num_gpus(config: BuildConfig, executor: ExecutorConfig) -> float:
    if executor.num_gpus_per_worker is not None:
        return float(executor.num_gpus_per_worker)
    if not config.audio_features.enabled:
        return 0.0
    try:
        import torch

        return 1.0 if torch.cuda.is_available() else 0.0
    except ImportError:
        return 0.0


def _map_sources(ds, config: BuildConfig, executor: ExecutorConfig, out_dir: str, workers: int):
    import ray.data

    return ds.map_batches(
        _SourceWorker,
        fn_constructor_kwargs={
            "config_dict": config.to_dict(),
            "out_dir": out_dir,
            "crash_on_source": executor.crash_on_source,
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
        num_cpus=executor.num_cpus_per_worker,
        num_gpus=_num_gpus(config, executor),
        max_restarts=executor.max_restarts,
        max_task_retries=executor.max_task_retries,
    )


def _run_round(sources: list[Source], out_dir: str, config: BuildConfig, executor: ExecutorConfig,
               workers: int, bar, totals: dict[str, float], timeline: list[dict]) -> None:
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.max_errored_blocks = -1          # a crashed source drops its block, not the build
    ctx.enable_progress_bars = False     # our own bar below counts sources, clips and footage
    if not log.isEnabledFor(logging.INFO):
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled" notice
    ctx.print_on_execution_start = False
    items = [{"source": json.dumps(asdict(s))} for s in sources]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    with warnings.catch_warnings():
        # max_restarts / max_task_retries only exist as **ray_remote_args in Ray 2.60 (deprecated
        # for removal in 2.64; revisit when upgrading).
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = _map_sources(ds, config, executor, out_dir, workers)
    for row in ds.iter_rows():
        timeline.append({"source_id": row["source_id"], "pid": int(row["pid"]), "start": float(row["start"]),
                         "wall_s": round(float(row["wall_s"]), 3), "duration_s": float(row["duration_s"])})
        totals["clips"] += row["clips"]
        totals["kept_s"] += row["kept_s"]
        totals["in_s"] += row["duration_s"]
        if row["status"] != "ok":
            totals["failed"] += 1
        if bar is not None:
            bar.set_postfix(clips=int(totals["clips"]), kept=f"{totals['kept_s']:.0f}s", failed=int(totals["failed"]))
            bar.update(1)


def _seal_crashed(source: Source, out_dir: str, config: BuildConfig, attempts: int) -> None:
    for leftover in (os.path.join(staging_dir(out_dir), f"{source.source_id}.tar.tmp"),):
        if os.path.exists(leftover):
            os.remove(leftover)
    row = ManifestRow(
        status="failed", source_id=source.source_id, path=source.path, kind=source.kind, language=source.language,
        licence=source.licence, reason="worker_crash", stage="worker",
        detail=f"the worker process died while staging this source ({attempts} round(s), each with Ray actor "
               "restarts/task retries); see the Ray worker logs (e.g. /tmp/ray/session_latest/logs)",
    ).to_dict()
    SourceStagingWriter(out_dir, source, config.to_dict()).seal([row], {"duration_s": 0.0}, "failed")


def build_corpus_ray(
    sources: Iterable[Source] | str,
    out_dir: str,
    config: Optional[BuildConfig] = None,
    address: Optional[str] = None,
    workers: Optional[int] = None,
    progress: bool = True,
    executor: Optional[ExecutorConfig] = None,
) -> BuildResult:
    """Build a corpus with Ray: stage every unfinished source on an actor pool, then finalise.

    ``address=None`` starts an embedded local Ray with ``workers`` (default: all) CPUs;
    ``"auto"`` / ``"ray://host:10001"`` / ``"host:port"`` join a running cluster, whose workers
    must see ``out_dir`` (a shared filesystem) and have this package installed.
    """
    from tqdm import tqdm

    config = config or BuildConfig()
    executor = executor or ExecutorConfig()
    if workers is not None:
        executor.workers = workers
    if executor.crash_on_source is None and os.environ.get(FAULT_ENV):
        executor.crash_on_source = os.environ[FAULT_ENV]
    sources = read_sources(sources) if isinstance(sources, str) else list(sources)
    out_dir = os.path.abspath(out_dir)
    if config.audio_features.enabled:
        from emo_data.audio_features import check_audio_encoder

        check_audio_encoder(config.audio_features)  # fail before any work, with a how-to
    os.makedirs(staging_dir(out_dir), exist_ok=True)
    todo = [s for s in sources if not is_done(out_dir, s.source_id)]
    # Longest first: the last source to start bounds the wall time on a small pool.
    probe = len(todo) <= 2000  # header probes cost ~10 ms each; huge corpora just go by file size
    todo.sort(key=lambda s: -_cost(s.path, probe))
    start = time.time()
    totals = {"clips": 0.0, "kept_s": 0.0, "in_s": 0.0, "failed": 0.0}
    rounds = 0
    timeline: list[dict] = []
    if todo:
        started = _start_ray(address, executor.workers, executor)
        try:
            import ray

            cpus = ray.cluster_resources().get("CPU", 1.0)
            pool = executor.workers or max(1, int(cpus // executor.num_cpus_per_worker))
            with tqdm(total=len(todo), unit="video", disable=not progress, desc="build (ray)", dynamic_ncols=True) as bar:
                for rounds in range(1, executor.source_retries + 2):
                    remaining = [s for s in todo if not is_done(out_dir, s.source_id)]
                    if not remaining:
                        rounds -= 1
                        break
                    if rounds > 1:
                        log.warning("round %d: %d source(s) unfinished after a worker crash, retrying", rounds, len(remaining))
                    _run_round(remaining, out_dir, config, executor, max(1, min(pool, len(remaining))), bar, totals, timeline)
                for source in todo:
                    if not is_done(out_dir, source.source_id):
                        _seal_crashed(source, out_dir, config, rounds)
                        bar.update(1)
        finally:
            if started:
                import ray

                ray.shutdown()
    summary = finalize_corpus(out_dir, [s.source_id for s in sources], config, wall_s=time.time() - start)
    _note_executor(out_dir, {"executor": "ray", "address": address or "embedded", "workers": executor.workers,
                             "rounds": rounds, "processed": len(todo), "skipped": len(sources) - len(todo),
                             "sources": [dict(t, start=round(t["start"] - start, 3)) for t in timeline]})
    return BuildResult(summary=summary, out_dir=out_dir, processed=len(todo), skipped=len(sources) - len(todo))


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
