"""The per-clip steps after the video pass, declared once for both executors.

Each :class:`ClipStep` says what it needs (does it hold a model, loaded once per worker? its
default CPU / GPU reservation; whether its model wants a GPU) and how to build its per-clip
function from a build config. The in-process executor runs the enabled steps in order; the Ray
build turns each one into an operator with one adapter (``pipelines/ray_build.py``): an actor
pool for a step that holds a model, tasks otherwise. Adding a per-clip stage means adding one
entry to :func:`clip_steps`; the executors need no change.

A step function takes a :class:`~emo_data.clip_work.ClipInFlight` and returns ``(kind, item)``:
``(CLIP, clip)`` to go on, ``(GATED, ClipResult)`` when a gate rejected the clip, ``(WRITTEN,
ClipResult)`` once the sample is staged. An exception is the step's failure; the executor turns it
into a ``failed`` row naming the step.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

from .config import BuildConfig, StageResources
from .ledger import CLIP, GATED, WRITTEN, ClipResult

StepFn = Callable[[Any], tuple[str, Any]]


@dataclass(frozen=True)
class ClipStep:
    name: str                                        # also the key of its resources in ExecutorConfig
    holds_model: bool                                # True: an actor pool, the model loaded once per actor
    default: StageResources                          # what one worker reserves unless configured
    enabled: Callable[[BuildConfig], bool]
    wants_gpu: Callable[[BuildConfig], bool]         # its model runs on a GPU when the cluster has one
    make: Callable[[BuildConfig, str, Optional[str]], StepFn]   # (config, device, out_dir) -> step function


def _sync_gate(config: BuildConfig, device: str, out_dir: Optional[str]) -> StepFn:
    from .clip_work import apply_sync_gate, gate_rejected_row
    from .sync.gate import SyncGateStage

    stage = SyncGateStage.from_build_config(config)
    if device != "cpu":
        stage.to(device)
    stage.ensure_setup()

    def gate(item):
        apply_sync_gate(item, stage)
        if item.rejected is not None:
            return GATED, ClipResult(item.key, gate_rejected_row(item))
        return CLIP, item

    return gate


def _head_pose(config: BuildConfig, device: str, out_dir: Optional[str]) -> StepFn:
    from .clip_work import add_head_motion
    from .pose import HeadPoseStage

    stage = HeadPoseStage(config.speed)
    return lambda item: (CLIP, add_head_motion(item, stage, config.clip.crop_size))


def _audio_features(config: BuildConfig, device: str, out_dir: Optional[str]) -> StepFn:
    from .audio_features import AudioFeatureStage
    from .clip_work import add_audio_features

    stage = AudioFeatureStage(replace(config.audio_features, device=device) if device != "cpu" else config.audio_features)
    stage.ensure_setup()
    return lambda item: (CLIP, add_audio_features(item, stage))


def _write(config: BuildConfig, device: str, out_dir: Optional[str]) -> StepFn:
    from .clip_work import assemble_sample, clip_row
    from .samples import SampleAssemblyStage
    from .staging import write_staged_sample

    if out_dir is None:
        raise ValueError("the write step needs the output folder")
    assemble = SampleAssemblyStage(config)
    stored_config = config.to_stored()

    def write(item):
        sample = assemble_sample(item, assemble, config)
        write_staged_sample(out_dir, item.clip.source.source_id, sample, stored_config)
        return WRITTEN, ClipResult(item.key, clip_row(item.clip, sample))

    return write


def _gate_wanted(config: BuildConfig) -> bool:
    from .sync.gate import SyncGateStage

    return SyncGateStage.wanted(config)


ALL_STEPS = (
    ClipStep("sync_gate", holds_model=True, default=StageResources(num_cpus=0.0), enabled=_gate_wanted,
             wants_gpu=lambda c: c.sync.enabled and c.sync.backend_name == "syncnet", make=_sync_gate),
    ClipStep("head_pose", holds_model=False, default=StageResources(num_cpus=0.0), enabled=lambda c: True,
             wants_gpu=lambda c: False, make=_head_pose),
    ClipStep("audio_features", holds_model=True, default=StageResources(num_cpus=0.0),
             enabled=lambda c: bool(c.audio_features.enabled), wants_gpu=lambda c: True, make=_audio_features),
    ClipStep("write", holds_model=False, default=StageResources(num_cpus=0.0), enabled=lambda c: True,
             wants_gpu=lambda c: False, make=_write),
)


def clip_steps(config: BuildConfig) -> list[ClipStep]:
    """The per-clip steps a build with ``config`` runs, in order."""
    return [step for step in ALL_STEPS if step.enabled(config)]


def step_named(name: str) -> ClipStep:
    for step in ALL_STEPS:
        if step.name == name:
            return step
    raise KeyError(f"no per-clip step named {name!r}")
