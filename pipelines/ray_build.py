"""Ray executor: the stages of ``emo_data`` as a streaming Ray Data graph, one operator per stage.

This module only wires. Wiring (docs/ray.md has the measurements)::

    ray.data.from_items(unfinished sources, longest first, one block each)
      .map_batches(Analyse)        actor pool: probe, audio decode (16 kHz), vocal separation, speech activity
      .map_batches(VideoPass)      actor pool: the single streaming pass over the frames (scene cuts, face
                                   backend, clip selection, crop, mp4); a generator, so each clip leaves
                                   the actor as soon as it is cut
      .map_batches(<clip step>)    one operator per per-clip step of emo_data/clip_steps.py, in order
                                   (sync_gate, head_pose, audio_features, write): an actor pool for a step
                                   that holds a model (a GPU each when it wants one and the cluster has
                                   GPUs), tasks otherwise
      -> the driver: an emo_data.ledger.SourceLedger seals each source once every clip of it is back
    finalize_corpus(...)           identity clusters -> identity-disjoint split -> final shards

Every model is loaded once per actor (``__init__``), never per item. Rows between operators are
``{"source_id", "kind", "item"}`` with typed items (emo_data/ledger.py). Blocks are kept small
(``DataContext.target_max_block_size``) so a clip is one block: memory in flight is a few clips
per operator, bounded by Ray Data's backpressure, whatever a video's length.

Staging and resume: the write step puts each clip in ``staging/<source>/<key>.tar`` (temporary
name, fsync, rename); the ledger seals a source (rows, then the ``.done`` marker with its
fingerprint) only when its end and every clip key it lists are back. A re-run skips sealed sources
whose fingerprint still matches and redoes the others from scratch (emo_data/resume.py, shared
with the in-process executor).

Fault isolation:

- an exception or :class:`StageError` in any operator becomes a ``failed`` row naming the source
  and the stage; the source is sealed as failed (no samples) and the build goes on;
- a worker *process* death (segfault or ``os._exit`` in a native library, OOM kill) kills the
  actor: Ray restarts it (``max_restarts``) and retries the call (``max_task_retries``); once
  spent, Ray Data drops that block (``max_errored_blocks = -1``) and goes on. Sources still unsealed
  after a round run again in a new round (``source_retries``), once the finished round's actors
  have given their CPUs back (pipelines/ray_runtime.py); whatever is unsealed then is sealed with
  reason ``worker_crash``, stage ``worker`` (a re-run tries it again);
- a stall watchdog: a round that delivers no row for ``ExecutorConfig.stall_timeout_s`` ends the
  build; every source not sealed by then becomes a failed row with reason ``stalled``.

Fault injection for tests: pipelines/faults.py.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Optional

from emo_data.clip_steps import ClipStep, clip_steps, step_named
from emo_data.config import BuildConfig, ExecutorConfig, StageResources
from emo_data.decode import work_estimate
from emo_data.finalize import finalize_corpus, note_executor
from emo_data.ledger import ANALYSED, CLIP, END, FAILED, ClipResult, SourceEnd, SourceLedger, seal_unfinished
from emo_data.staging import clear_source, is_done, staging_dir
from emo_data.types import Source

from .faults import FAULT_ENV, STALL_ENV, CrashFault, StallFault
from .local import BuildResult, prepare_sources
from .progress import SealProgress
from .ray_runtime import Watched, assigned_gpu, native_logs_hidden, release_round, start_ray, worker_logging

log = logging.getLogger("emo.build.ray")

# One clip (mp4 + audio + arrays, ~1-4 MB) per block, so clips stream one by one.
_BLOCK_BYTES = 256 * 1024


def _rows(rows: list[tuple[str, str, Any]]) -> dict[str, list]:
    return {"source_id": [r[0] for r in rows], "kind": [r[1] for r in rows], "item": [r[2] for r in rows]}


# ------------------------------------------------------------------------------------------ operators
class Analyse:
    """Actor: probe, audio decode, vocal separation and speech activity (the separator and the
    speech model load once per actor, on the GPU Ray assigned it, if any)."""

    def __init__(self, config_dict: dict):
        from emo_data.analysis import SourceAnalysisStage

        worker_logging()
        config = BuildConfig.from_dict(config_dict)
        gpu = assigned_gpu()
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
                end = SourceEnd(keys=[], rows=[], summary={"duration_s": exc.duration_s},
                                failure=failed_row(source, exc.stage, exc.cause))
                out.append((source.source_id, END, end))
        return _rows(out)


class VideoPass:
    """Actor: the single streaming pass over a source's frames (the face backend loads once per
    actor). Yields each clip as soon as it is cut, then the source's end."""

    def __init__(self, config_dict: dict, crash_on_source: Optional[str] = None, stall: Optional[str] = None):
        from emo_data.clips import VideoPassStage

        worker_logging()
        self.config = BuildConfig.from_dict(config_dict)
        self.crash = CrashFault.parse(crash_on_source)
        self.stall = StallFault.parse(stall)
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
        end = SourceEnd(keys=[], rows=[], summary={"duration_s": analysed.probe.duration_s})
        try:
            for item in self.video(VideoPassInput.from_analysis(analysed)):
                if isinstance(item, ClipCandidate):
                    end.keys.append(item.key)
                    yield _rows([(source.source_id, CLIP, ClipInFlight(item))])
                    if self.crash is not None:
                        self.crash.maybe_crash(source.source_id, clips_out=len(end.keys))
                    if self.stall is not None:
                        self.stall.after_clip(source.source_id)
                elif isinstance(item, RejectedSpan):
                    end.rows.append(rejected_row(source, item))
                elif isinstance(item, VideoPassSummary):
                    end.summary.update(item.totals())
        except Exception as exc:  # noqa: BLE001 - errors are rows
            end.failure = failed_row(source, "video_pass", exc)
        yield _rows([(source.source_id, END, end)])


def _apply_step(batch: dict[str, Any], step_name: str, fn) -> dict[str, list]:
    """Apply a per-clip step to the clips of a batch; pass other rows through; an error is a
    ``failed`` result naming the step."""
    from emo_data.clip_work import failed_row

    out = []
    for source_id, kind, item in zip(batch["source_id"], batch["kind"], batch["item"]):
        if kind != CLIP:
            out.append((source_id, kind, item))
            continue
        try:
            out.append((source_id,) + fn(item))
        except Exception as exc:  # noqa: BLE001 - errors are rows
            out.append((source_id, FAILED, ClipResult(item.key, failed_row(item.clip.source, step_name, exc))))
    return _rows(out)


class ClipStepActor:
    """The one adapter from a per-clip step that holds a model to a Ray actor: the step (and its
    model) is built once per actor, on the GPU Ray assigned it, if any."""

    def __init__(self, step: str, config_dict: dict, out_dir: Optional[str] = None):
        worker_logging()
        self.name = step
        self.fn = step_named(step).make(BuildConfig.from_dict(config_dict), "cuda" if assigned_gpu() else "cpu", out_dir)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        return _apply_step(batch, self.name, self.fn)


def clip_step_task(batch: dict[str, Any], step: str, config_dict: dict, out_dir: Optional[str] = None) -> dict[str, list]:
    """The adapter for a light per-clip step (no model): a Ray task per batch."""
    return _apply_step(batch, step, step_named(step).make(BuildConfig.from_dict(config_dict), "cpu", out_dir))


# ------------------------------------------------------------------------------------------ plan
@dataclass
class _Plan:
    """Resolved resources per operator for this cluster."""

    video_actors: int
    analyse_actors: int
    analyse_gpus: float
    task_concurrency: int
    steps: dict[str, dict[str, float]] = field(default_factory=dict)   # per-clip step -> actors/tasks, cpus, gpus


def _plan(config: BuildConfig, executor: ExecutorConfig, sources: int, cpus: float, gpus: float) -> _Plan:
    """Actors per pool for a cluster with ``cpus`` / ``gpus``. Every pool needs at least one
    actor at once (Ray Data starts them up front), so the reservations must fit together: video
    actors are cut down to fit, and a configuration that cannot fit at all is an error now
    rather than a build that waits forever for resources."""
    separates = config.vocals.mode != "never" and bool(config.vocals.weights)
    analyse_wants = config.speech.backend == "pyannote" or separates
    steps_wanting = [st for st in clip_steps(config) if st.holds_model and st.wants_gpu(config)
                     and executor.resources_for(st.name, st.default).num_gpus is None]
    # GPUs left to "auto" are shared evenly by the pools that want one: a whole GPU per actor when
    # there are enough, else a fraction, so every pool gets at least one actor.
    auto_pools = len(steps_wanting) + int(analyse_wants and executor.analyse.num_gpus is None)
    per_pool = gpus / auto_pools if auto_pools else 0.0
    auto_gpu = min(1.0, per_pool)

    def gpus_for(stage: StageResources, uses_model: bool) -> float:
        if stage.num_gpus is not None:
            return float(stage.num_gpus)
        return auto_gpu if uses_model and gpus > 0 else 0.0

    def gpu_actors(stage_gpus: float) -> int:
        return max(1, int((per_pool + 1e-9) // stage_gpus)) if stage_gpus else 0

    analyse_gpus = gpus_for(executor.analyse, analyse_wants)
    video = executor.workers or max(1, int(cpus // max(executor.video.num_cpus, 1e-3)))
    video = max(1, min(executor.video.concurrency or video, sources))
    # Light pools: a quarter (analysis) or half (a per-clip model on CPU) as many actors as video
    # passes (one wav2vec actor kept up with two video passes in bench/build_scaling.py); one per
    # GPU when they run on GPUs.
    analyse = min(executor.analyse.concurrency or (gpu_actors(analyse_gpus) if analyse_gpus else max(1, video // 4)), sources)
    steps: dict[str, dict[str, float]] = {}
    for step in clip_steps(config):
        res = executor.resources_for(step.name, step.default)
        step_gpus = gpus_for(res, step.holds_model and step.wants_gpu(config))
        if step.holds_model:
            count = res.concurrency or (gpu_actors(step_gpus) if step_gpus else max(1, video // 2))
        else:
            count = res.concurrency or max(1, video)
        steps[step.name] = {"workers": int(count), "num_cpus": float(res.num_cpus), "num_gpus": step_gpus,
                            "batch_size": int(res.batch_size), "actors": bool(step.holds_model)}

    def cpus_needed(v: int) -> float:
        return (v * executor.video.num_cpus + analyse * executor.analyse.num_cpus
                + sum(s["workers"] * s["num_cpus"] for s in steps.values() if s["actors"]))

    while video > 1 and cpus_needed(video) > cpus + 1e-6:
        video -= 1
    gpus_needed = (analyse * analyse_gpus + video * (executor.video.num_gpus or 0.0)
                   + sum(s["workers"] * s["num_gpus"] for s in steps.values() if s["actors"]))
    if cpus_needed(video) > cpus + 1e-6 or gpus_needed > gpus + 1e-6:
        pools = ", ".join(f"{int(s['workers'])} {name}" for name, s in steps.items() if s["actors"])
        raise RuntimeError(
            f"the stage resources do not fit the cluster: {video} video-pass, {analyse} analyse and {pools} actors "
            f"need {cpus_needed(video):g} CPUs and {gpus_needed:g} GPUs, the cluster has {cpus:g} CPUs and {gpus:g} "
            "GPUs; lower num_cpus / num_gpus / concurrency in --executor-config (see docs/ray.md)")
    return _Plan(video_actors=video, analyse_actors=analyse, analyse_gpus=analyse_gpus, task_concurrency=max(1, video),
                 steps=steps)


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
    for step in clip_steps(config):
        ds = _step_operator(ds, step, plan.steps[step.name], config_dict, out_dir, actor_args)
    return ds


def _step_operator(ds, step: ClipStep, res: dict[str, Any], config_dict: dict, out_dir: str, actor_args: dict):
    import ray.data

    kwargs = {"step": step.name, "config_dict": config_dict, "out_dir": out_dir}
    if step.holds_model:
        return ds.map_batches(
            ClipStepActor, fn_constructor_kwargs=kwargs, batch_size=res["batch_size"],
            compute=ray.data.ActorPoolStrategy(size=int(res["workers"]), max_tasks_in_flight_per_actor=1),
            num_cpus=res["num_cpus"], num_gpus=res["num_gpus"], **actor_args,
        )
    return ds.map_batches(
        clip_step_task, fn_kwargs=kwargs, batch_size=res["batch_size"], num_cpus=res["num_cpus"],
        compute=ray.data.TaskPoolStrategy(size=int(res["workers"])),
    )


# ------------------------------------------------------------------------------------------ driver
def _run_round(sources: list[Source], out_dir: str, config: BuildConfig, executor: ExecutorConfig, plan: _Plan,
               ledger: SourceLedger, bar: SealProgress, stage_bars: bool, totals: dict[str, float], timeline: list[dict],
               t0: float) -> bool:
    """One pass of the graph over ``sources``; False when the stall watchdog ended it."""
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
    rows = Watched(ds.iter_rows(), executor.stall_timeout_s)
    for row in rows:
        outcome = ledger.add(row["source_id"], row["kind"], row["item"])
        if outcome is None:
            continue
        summary = outcome.summary
        timeline.append({"source_id": outcome.source_id, "sealed_at": round(time.time() - t0, 3),
                         "duration_s": float(summary.get("duration_s", 0.0)), "status": outcome.status})
        totals["clips"] += summary.get("clips", 0)
        totals["kept_s"] += summary.get("kept_s", 0.0)
        totals["in_s"] += summary.get("duration_s", 0.0)
        totals["failed"] += outcome.status != "ok"
        bar.sealed(outcome.source_id, outcome.status, summary, totals)
    if rows.stalled:
        return False
    try:  # Ray Data's per-operator timings: where the wall time of this build went
        with open(os.path.join(out_dir, "ray_stats.txt"), "a") as fh:
            fh.write(ds.stats() + "\n")
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        log.info("no Ray Data stats: %s", exc)
    return True


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
    todo.sort(key=lambda s: -work_estimate(s.path, probe))
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
        with native_logs_hidden(not verbose):
            started = start_ray(address, executor.workers, executor, extra_env)
            try:
                import ray

                resources = ray.cluster_resources()
                plan = _plan(config, executor, len(todo), resources.get("CPU", 1.0), resources.get("GPU", 0.0))
                ledger = SourceLedger(todo, out_dir, resume.fingerprints)
                with SealProgress(len(todo), progress, stage_bars) as bar:
                    for rounds in range(1, executor.source_retries + 2):
                        remaining = [s for s in todo if not is_done(out_dir, s.source_id)]
                        if not remaining:
                            rounds -= 1
                            break
                        if rounds > 1:
                            log.warning("round %d: %d source(s) unsealed after a worker crash, retrying", rounds, len(remaining))
                            release_round(started and not address, address, executor, extra_env)
                        if not _run_round(remaining, out_dir, config, executor, plan, ledger, bar, stage_bars, totals,
                                          timeline, start):
                            stalled = True
                            break
                    for source in todo:
                        if is_done(out_dir, source.source_id):
                            continue
                        _seal_lost(source, out_dir, rounds, stalled, executor, resume.fingerprints.get(source.source_id))
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
        note_executor(out_dir, {"executor": "ray", "address": address or "embedded", "workers": executor.workers,
                                "plan": asdict(plan) if plan else None, "executor_config": executor.to_stored(),
                                "rounds": rounds, "stalled": stalled, "processed": len(todo),
                                "skipped": len(sources) - len(todo), "sources": timeline})
    return BuildResult(summary=summary, out_dir=out_dir, processed=len(todo), skipped=len(sources) - len(todo), plan=resume)


def _seal_lost(source: Source, out_dir: str, rounds: int, stalled: bool, executor: ExecutorConfig,
               fingerprint: Optional[dict]) -> None:
    """A source no round finished: the build stalled, or its worker kept dying."""
    if stalled:
        seal_unfinished(source, out_dir, "stalled",
                        f"the build delivered no output for {executor.stall_timeout_s:g} s "
                        "(ExecutorConfig.stall_timeout_s / --stall-timeout) while this source was "
                        "unfinished; the build was ended", fingerprint)
    else:
        seal_unfinished(source, out_dir, "worker_crash",
                        f"a worker process died while handling this source ({rounds} round(s), each with Ray actor "
                        "restarts/task retries); see the Ray worker logs (e.g. /tmp/ray/session_latest/logs)",
                        fingerprint)
