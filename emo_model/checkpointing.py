"""Resumable, samplable training checkpoints, written atomically.

A checkpoint is a directory ``<out>/checkpoint-<step>`` that is at the same time

* an ``EMOPipeline`` directory (``model_index.json``, ``emo/``, ``vae/``, ``audio_encoder/``,
  ``feature_extractor/``, ``scheduler/``): ``emo-sample --model <dir>`` and
  ``EMOPipeline.from_pretrained(<dir>)`` take it as it is; ``emo_ema/`` holds the EMA weights
  (``emo-sample --ema``); and
* the complete training state (``training_state/``): optimizer and LR scheduler (safetensors +
  JSON, no pickle), EMA step, the step and micro-batch count, the data position of every rank and
  DataLoader worker, the random states of every rank (Python, NumPy, torch CPU/CUDA and the
  training generator), plus ``train_config.json``.

Only the main process writes. It writes into ``<out>/.tmp-checkpoint-<step>-<pid>/``, syncs the
files and renames the directory into place, so a checkpoint directory exists completely or not at
all (``state.json`` is written last; directories without it are ignored). The pipeline
components that do not train (VAE, audio encoder, feature extractor, scheduler) are saved once
to ``<out>/.components/`` and hard-linked into every checkpoint (copied where links are not
possible), so a checkpoint costs the EMO weights + optimizer state only.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from typing import Any, Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
STATE_DIR = "training_state"
COMPONENTS_DIR = ".components"
PIPELINE_COMPONENTS = ("vae", "audio_encoder", "feature_extractor", "scheduler")
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# ----------------------------------------------------------------------------- discovery
def list_checkpoints(out: str) -> list[tuple[int, str]]:
    """Complete checkpoints under ``out``, oldest first."""
    found = []
    if not os.path.isdir(out):
        return found
    for name in os.listdir(out):
        m = _CHECKPOINT_RE.match(name)
        path = os.path.join(out, name)
        if m and os.path.isfile(os.path.join(path, STATE_DIR, "state.json")):
            found.append((int(m.group(1)), path))
    return sorted(found)


def resolve_resume(out: str, resume: Optional[str]) -> Optional[str]:
    """``None`` -> None; ``latest`` -> the newest complete checkpoint in ``out`` (None when there is
    none: a fresh start); a directory -> itself, if it is a complete checkpoint."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(out)
        if not found:
            logger.info("--resume latest: no checkpoint in %s yet, starting from step 0", out)
            return None
        return found[-1][1]
    if not os.path.isfile(os.path.join(resume, STATE_DIR, "state.json")):
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (no {STATE_DIR}/state.json)")
    return resume


def read_state(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, STATE_DIR, "state.json")) as fh:
        return json.load(fh)


def remove_stale(out: str) -> None:
    """Leftovers of a run killed while writing: ``.tmp-*`` / ``.trash-*`` directories."""
    if not os.path.isdir(out):
        return
    for name in os.listdir(out):
        if name.startswith((".tmp-checkpoint-", ".trash-checkpoint-")):
            logger.info("removing the incomplete %s", os.path.join(out, name))
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)


def prune(out: str, keep: Optional[int]) -> list[str]:
    """Delete all but the ``keep`` newest checkpoints; returns the deleted paths."""
    if not keep:
        return []
    found = list_checkpoints(out)
    removed = []
    for _, path in found[: max(len(found) - keep, 0)]:
        trash = os.path.join(out, f".trash-{os.path.basename(path)}-{os.getpid()}")
        os.rename(path, trash)  # atomic: never a half-deleted checkpoint under its real name
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(path)
    return removed


# ----------------------------------------------------------------------------- tensors + JSON
def _flatten(obj: Any, tensors: dict, prefix: str) -> Any:
    if torch.is_tensor(obj):
        tensors[prefix] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, tensors, f"{prefix}.k{i}"), _flatten(v, tensors, f"{prefix}.{i}")]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} in a checkpoint")


def _unflatten(obj: Any, tensors: dict) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_structured(obj: Any, path_stem: str) -> None:
    """Any nest of dicts / lists / tuples / tensors / scalars -> ``<stem>.json`` + ``<stem>.safetensors``."""
    from safetensors.torch import save_file

    tensors: dict = {}
    tree = _flatten(obj, tensors, "t")
    if tensors:
        save_file(tensors, path_stem + ".safetensors")
    _write_json(path_stem + ".json", {"tree": tree, "has_tensors": bool(tensors)})


def load_structured(path_stem: str, device=None) -> Any:
    from safetensors.torch import load_file

    with open(path_stem + ".json") as fh:
        data = json.load(fh)
    tensors = load_file(path_stem + ".safetensors") if data["has_tensors"] else {}  # CPU ("cpu:0" is refused)
    if device is not None and torch.device(device).type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return _unflatten(data["tree"], tensors)


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


# ----------------------------------------------------------------------------- random states
def capture_rng(generator: Optional[torch.Generator] = None) -> dict:
    """This process's random states (Python, NumPy legacy global, torch CPU and CUDA, the training generator)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng(state: dict, generator: Optional[torch.Generator] = None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.to(torch.uint8) for t in state["cuda"]])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"].to(torch.uint8))


# ----------------------------------------------------------------------------- writing
def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def link_tree(src: str, dst: str) -> None:
    """Hard-link every file of ``src`` into ``dst`` (copy where linking fails, e.g. across filesystems)."""
    for dirpath, _, files in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        target_dir = os.path.normpath(os.path.join(dst, rel))
        os.makedirs(target_dir, exist_ok=True)
        for name in files:
            s, d = os.path.join(dirpath, name), os.path.join(target_dir, name)
            try:
                os.link(s, d)
            except OSError:
                shutil.copy2(s, d)


def write_components(out: str, vae, audio_encoder, feature_extractor, scheduler) -> Optional[str]:
    """Save the non-trained pipeline parts once to ``<out>/.components`` (atomically). Returns the
    directory, or None (logged) when the audio encoder is missing: checkpoints then hold ``emo/`` +
    state only and are not samplable until the parts are added."""
    path = os.path.join(out, COMPONENTS_DIR)
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return path
    if audio_encoder is None or feature_extractor is None:
        logger.warning("no audio encoder (pass --audio-encoder or a --model pipeline directory): checkpoints will hold "
                       "the EMO weights and the training state, but not the vae/audio_encoder/... that emo-sample needs")
        return None
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(os.path.join(tmp, "vae"), safe_serialization=True)
    audio_encoder.save_pretrained(os.path.join(tmp, "audio_encoder"), safe_serialization=True)
    feature_extractor.save_pretrained(os.path.join(tmp, "feature_extractor"))
    scheduler.save_pretrained(os.path.join(tmp, "scheduler"))
    from .pipeline import EMOPipeline

    index = {"_class_name": EMOPipeline.__name__}
    try:
        import diffusers

        index["_diffusers_version"] = diffusers.__version__
    except Exception:  # noqa: BLE001
        pass
    index.update({
        "audio_encoder": ["transformers", type(audio_encoder).__name__],
        "emo": ["emo_model.model", "EMOModel"],
        "feature_extractor": ["transformers", type(feature_extractor).__name__],
        "scheduler": ["diffusers", type(scheduler).__name__],
        "vae": ["diffusers", type(vae).__name__],
    })
    _write_json(os.path.join(tmp, "model_index.json"), index)
    _fsync_tree(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.rename(tmp, path)
    return path


def save_ema_weights(model, ema, trainable_names: list, path: str) -> None:
    """``model``'s weights with the trained parameters replaced by their EMA, as an EMOModel directory."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    for name, shadow in zip(trainable_names, ema.shadow_params):
        state[name] = shadow.detach().to("cpu", state[name].dtype).contiguous()
    os.makedirs(path, exist_ok=True)
    model.save_config(path)
    save_file(state, os.path.join(path, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def write_checkpoint(out: str, step: int, *, model, optimizer, lr_scheduler, ema, trainable_names: list, config,
                     state: dict, rng_states: list, components: Optional[str]) -> str:
    """Write ``<out>/checkpoint-<step>`` atomically (main process only). ``state``: JSON-able
    training state (step, micro-batches, data position...); ``rng_states``: one dict per rank."""
    final = os.path.join(out, f"{PREFIX}{step}")
    tmp = os.path.join(out, f".tmp-{PREFIX}{step}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, STATE_DIR))
    t0 = time.time()
    model.save_pretrained(os.path.join(tmp, "emo"), safe_serialization=True)
    if ema is not None:
        save_ema_weights(model, ema, trainable_names, os.path.join(tmp, "emo_ema"))
        ema_meta = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
        _write_json(os.path.join(tmp, STATE_DIR, "ema.json"), ema_meta)
    if components:
        for name in PIPELINE_COMPONENTS:
            link_tree(os.path.join(components, name), os.path.join(tmp, name))
        shutil.copy2(os.path.join(components, "model_index.json"), os.path.join(tmp, "model_index.json"))
    config.save(os.path.join(tmp, "train_config.json"))
    save_structured(optimizer.state_dict(), os.path.join(tmp, STATE_DIR, "optimizer"))
    save_structured(lr_scheduler.state_dict(), os.path.join(tmp, STATE_DIR, "lr_scheduler"))
    for rank, rng in enumerate(rng_states):
        save_structured(rng, os.path.join(tmp, STATE_DIR, f"rng_rank{rank}"))
    _fsync_tree(tmp)
    _write_json(os.path.join(tmp, STATE_DIR, "state.json"), dict(state, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
                                                                 samplable=bool(components), ema=ema is not None))
    if os.path.exists(final):  # re-running steps after resuming from an older checkpoint
        trash = os.path.join(out, f".trash-{PREFIX}{step}-{os.getpid()}")
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(out)
    logger.info("saved %s (%.1f s)", final, time.time() - t0)
    return final


def load_training_state(checkpoint: str, *, optimizer, lr_scheduler, ema, trainable_names: list, device) -> dict:
    """Restore optimizer, LR scheduler and EMA from ``checkpoint``; returns its ``state.json``."""
    from safetensors.torch import load_file

    state = read_state(checkpoint)
    optimizer.load_state_dict(load_structured(os.path.join(checkpoint, STATE_DIR, "optimizer"), device=device))
    lr_scheduler.load_state_dict(load_structured(os.path.join(checkpoint, STATE_DIR, "lr_scheduler")))
    if ema is not None:
        ema_dir = os.path.join(checkpoint, "emo_ema")
        if os.path.isdir(ema_dir):
            with open(os.path.join(checkpoint, STATE_DIR, "ema.json")) as fh:
                meta = json.load(fh)
            weights = load_file(os.path.join(ema_dir, "diffusion_pytorch_model.safetensors"))
            meta["shadow_params"] = [weights[n].to(device=device, dtype=torch.float32) for n in trainable_names]
            ema.load_state_dict(meta)
        else:
            logger.warning("%s has no EMA weights (trained without --use-ema): the EMA starts from the current weights",
                           checkpoint)
    return state


def load_rng(checkpoint: str, rank: int) -> Optional[dict]:
    stem = os.path.join(checkpoint, STATE_DIR, f"rng_rank{rank}")
    return load_structured(stem) if os.path.isfile(stem + ".json") else None
