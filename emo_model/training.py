"""EMO training, three stages (paper §3.3; all 512 x 512, learning rate 1e-5), from WebDataset shards.

1. ``image``: backbone + ReferenceNet + face locator. The backbone denoises one frame (temporal
   modules skipped), the ReferenceNet sees a different random frame of the same clip.
2. ``video``: + temporal modules and audio layers. n + f = 4 + 12 consecutive frames; the first
   4 are motion frames (through the ReferenceNet), the loss is on the 12 others.
3. ``speed``: only the temporal modules and the speed layers train; audio layers are frozen.

    emo-train --config configs/train/stage2-video.yaml --model runs/stage1/checkpoint-30000 \\
        --motion-module mm_sd_v15_v2.ckpt --shards 'data/train-{000000..000099}.tar' --out runs/stage2
    emo-train --config ... --resume latest          # continue an interrupted run
    torchrun --nproc_per_node 8 -m emo_model.training --config ...   # DDP (also accelerate launch)

Data: :mod:`emo_model.train_data` (index-driven, seeded, resumable, split by sample across ranks and
workers; pre-encoded latents when the shards have them). Checkpoints: :mod:`emo_model.checkpointing`
(every one is an ``EMOPipeline`` directory + the full training state, written atomically).
Validation videos: :mod:`emo_model.validation`. Configuration: :class:`TrainConfig` (YAML/JSON).
See docs/training.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpointing as ckpt
from .train_config import STAGES, TrainConfig, add_config_arguments, config_from_args
from .train_data import (
    DataContractError,
    ItemMaker,
    ShardStream,
    StreamLayout,
    check_contract,
    collate,
    expand_shards,
    load_catalog,
    make_loader,
)

logger = logging.getLogger(__name__)

__all__ = [
    "STAGES", "TrainConfig", "Components", "DataContractError", "collate", "load_components", "train",
    "trainable_parameter_names", "reachable_parameter_names", "training_loss", "main",
]


# ----------------------------------------------------------------------------- parameters
def trainable_parameter_names(model, stage: str, freeze_spatial: bool = False) -> list[str]:
    """Which of ``model``'s parameters a stage trains by design (before removing those that get no gradient)."""
    names = []
    for name, _ in model.named_parameters():
        temporal = ".motion_modules." in name
        speed = ".speed_" in name or name.startswith("speed_proj.")
        audio = ".audio_" in name or name.startswith("audio_proj.")
        spatial = not (temporal or speed or audio)  # backbone SD part, ReferenceNet, face locator
        if stage == "image":
            ok = spatial
        elif stage == "video":
            ok = (temporal and not speed) or audio or (spatial and not freeze_spatial)
        else:  # speed
            ok = temporal or speed
        if ok:
            names.append(name)
    return names


def forward_kwargs(stage: str, reference_latents, mask, motion_latents=None, audio=None, speed=None,
                   reference_keep=None, motion_keep=None) -> dict:
    """The ``EMOModel.forward`` keyword arguments of a training step of ``stage`` (the ReferenceNet
    runs inside the forward so that a DDP wrapper sees every parameter)."""
    kwargs = dict(reference_latents=reference_latents, face_mask=mask, reference_keep=reference_keep)
    if stage == "image":
        kwargs["use_temporal"] = False
    else:
        kwargs.update(motion_latents=motion_latents, motion_keep=motion_keep, audio_features=audio)
        if stage == "speed":
            kwargs["speed_buckets"] = speed
    return kwargs


def reachable_parameter_names(config, stage: str) -> set:
    """Parameters that get a gradient from a training step of ``stage``, found by one forward +
    backward of the model built from ``config`` on the meta device (no memory, no compute).

    E.g. in stage image the ReferenceNet's last transformer block after its ``norm1`` (whose
    output nothing reads when there are no motion frames) is unreachable; training it would only
    make DDP fail ("parameters that did not receive grad"). Stages video/speed always feed motion
    latents (dropped per sample by zeroing), so the whole ReferenceNet is reachable there."""
    from .model import EMOModel

    cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    with torch.device("meta"):
        probe = EMOModel(**cfg)
        b, n, f, h = 1, int(cfg.get("num_motion_frames", 4)), int(cfg.get("num_frames", 12)), 8
        frames = 1 if stage == "image" else f
        w = 2 * int(cfg.get("audio_window", 2)) + 1
        kwargs = forward_kwargs(
            stage, torch.randn(b, 4, h, h), torch.rand(b, 1, 8 * h, 8 * h),
            motion_latents=torch.randn(b, n, 4, h, h),
            audio=torch.randn(b, f, w, int(cfg["audio_layers"]), int(cfg["audio_feature_dim"])),
            speed=torch.randn(b, n + f, 2 * int(cfg.get("speed_window", 2)) + 1, int(cfg["speed_buckets"])),
        )
        out = probe(torch.randn(b, int(cfg.get("in_channels", 4)), frames, h, h), torch.tensor([10]), **kwargs).sample
        out.float().sum().backward()
    return {name for name, p in probe.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- one step
def _pixels(x: torch.Tensor, device, dtype) -> torch.Tensor:
    x = x.to(device)
    if x.dtype == torch.uint8:
        return x.to(dtype).div(127.5).sub(1.0)
    return x.to(dtype)


def training_loss(model, vae, scheduler, batch: dict, stage: str, cfg: TrainConfig, generator: torch.Generator,
                  config=None, latent_scale: Optional[float] = None) -> torch.Tensor:
    """The denoising loss of one batch (epsilon / v prediction, MSE on the generated frames).

    Per-sample classifier-free-guidance dropout (reference, audio, motion frames, speed) from
    ``generator``; optional noise offset and min-SNR weighting (``cfg.snr_gamma``). Batches hold
    either pixels (uint8, encoded here with ``vae``, a posterior sample) or pre-encoded latents
    (unscaled posterior means, multiplied by ``latent_scale``)."""
    config = config or model.config
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    sf = float(latent_scale if latent_scale is not None else vae.config.scaling_factor)

    def encode(pix):  # uint8 [N, 3, S, S] -> [N, 4, s, s]
        with torch.no_grad():
            x = _pixels(pix, device, vae.dtype)
            return vae.encode(x).latent_dist.sample(generator) * sf

    def latents(key_lat, key_pix):
        if key_lat in batch:
            return batch[key_lat].to(device=device, dtype=torch.float32) * sf
        shape = batch[key_pix].shape
        return encode(batch[key_pix].reshape(-1, *shape[-3:])).reshape(*shape[:-3], -1, *encode_shape(shape))

    def encode_shape(shape):
        d = 2 ** (len(vae.config.block_out_channels) - 1)
        return shape[-2] // d, shape[-1] // d

    b = batch["mask"].shape[0]
    ref_lat = latents("reference_latents", "reference").to(dtype)
    mask = batch["mask"].to(device=device, dtype=dtype)
    if batch["mask"].dtype == torch.uint8:  # face_mask.png is 0/255
        mask = mask / 255.0
    n = int(config.num_motion_frames)
    u = torch.rand(b, 4, generator=generator)  # per-sample dropout draws: reference, audio, motion, speed
    reference_keep = (u[:, 0] >= cfg.drop_reference).to(device)
    motion_lat, motion_keep, audio, speed = None, None, None, None
    if stage == "image":
        target = latents("target_latents", "target").to(dtype).permute(0, 2, 1, 3, 4)  # [B, 4, 1, s, s]
    else:
        lat = latents("frame_latents", "frames").to(dtype)  # [B, n+f, 4, s, s]
        motion_lat = lat[:, :n]
        target = lat[:, n:].permute(0, 2, 1, 3, 4)  # [B, 4, f, s, s]
        motion_keep = (u[:, 2] >= cfg.drop_motion).to(device)
        audio = batch["audio"].to(device=device, dtype=dtype)
        audio = audio * (u[:, 1] >= cfg.drop_audio).to(device=device, dtype=dtype).view(-1, *([1] * (audio.ndim - 1)))
        if stage == "speed":
            speed = batch["speed"].to(device=device, dtype=dtype)
            speed = speed * (u[:, 3] >= cfg.drop_speed).to(device=device, dtype=dtype).view(-1, *([1] * (speed.ndim - 1)))
    noise = torch.randn(target.shape, generator=generator)
    if cfg.noise_offset:  # one offset per (sample, channel), shared by frames and pixels
        noise = noise + cfg.noise_offset * torch.randn(target.shape[0], target.shape[1], 1, 1, 1, generator=generator)
    noise = noise.to(device=device, dtype=dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(device)
    noisy = scheduler.add_noise(target, noise, t)
    kwargs = forward_kwargs(stage, ref_lat, mask, motion_lat, audio, speed, reference_keep, motion_keep)
    pred = model(noisy, t, **kwargs).sample
    if scheduler.config.prediction_type == "v_prediction":
        goal = scheduler.get_velocity(target, noise, t)
    else:
        goal = noise
    if not cfg.snr_gamma:
        return F.mse_loss(pred.float(), goal.float())
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, t).float()
    weight = torch.clamp(snr, max=cfg.snr_gamma) / (snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr)
    per_sample = F.mse_loss(pred.float(), goal.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    return (per_sample * weight).mean()


# ----------------------------------------------------------------------------- components
class Components(NamedTuple):
    model: object  # EMOModel
    vae: object  # AutoencoderKL
    noise_scheduler: object  # DDPMScheduler (training)
    audio_encoder: object = None  # Wav2Vec2Model (validation, samplable checkpoints)
    feature_extractor: object = None
    sample_scheduler: object = None  # the pipeline's DDIM scheduler
    vae_dir: Optional[str] = None


def load_components(cfg: TrainConfig, source: Optional[str] = None) -> Components:
    """Model, VAE, schedulers and (when available) the audio encoder, from ``source`` (default
    ``cfg.model``): an EMOPipeline directory (a checkpoint is one) or an EMOModel directory (then
    ``cfg.vae`` is needed, ``cfg.audio_encoder`` for validation / samplable checkpoints)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler

    from .model import EMOModel

    root = source or cfg.model
    if not root:
        raise ValueError("--model is required (an EMOPipeline directory or an EMOModel directory + --vae)")
    pipeline_dir = os.path.isdir(os.path.join(root, "emo"))
    model = EMOModel.from_pretrained(os.path.join(root, "emo") if pipeline_dir else root)
    vae_dir = cfg.vae or (os.path.join(root, "vae") if pipeline_dir else None)
    if not vae_dir or not os.path.isdir(vae_dir):
        raise ValueError(f"no VAE: {root} is an EMOModel directory; pass --vae DIR")
    vae = AutoencoderKL.from_pretrained(vae_dir)
    sched_dir = os.path.join(root, "scheduler")
    if os.path.isdir(sched_dir):
        sample_scheduler = DDIMScheduler.from_pretrained(sched_dir)
    else:
        sample_scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    noise_scheduler = DDPMScheduler.from_config(sample_scheduler.config)
    audio_dir = cfg.audio_encoder or (os.path.join(root, "audio_encoder") if pipeline_dir else None)
    audio_encoder = feature_extractor = None
    if audio_dir and os.path.isdir(audio_dir):
        from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

        audio_encoder = Wav2Vec2Model.from_pretrained(audio_dir)
        fe_dir = os.path.join(root, "feature_extractor")
        fe_dir = fe_dir if (pipeline_dir and not cfg.audio_encoder and os.path.isdir(fe_dir)) else audio_dir
        feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(fe_dir)
    return Components(model, vae, noise_scheduler, audio_encoder, feature_extractor, sample_scheduler, vae_dir)


# ----------------------------------------------------------------------------- helpers
def _seed(*parts: int) -> int:
    """A 63-bit seed from ``(seed, purpose, rank, ...)`` (independent streams per rank and purpose)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def _make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration

    if "tensorboard" in cfg.log_with:
        from accelerate.utils import is_tensorboard_available

        if not is_tensorboard_available():
            raise RuntimeError("--log-with tensorboard needs the tensorboard package: pip install tensorboard "
                               "(or --log-with none)")
    from accelerate.state import AcceleratorState

    # accelerate keeps one global state per process; a second train() in the same process (tests,
    # notebooks, chained stages) may use other precision settings. The process group is kept.
    AcceleratorState._reset_state()
    # No GPU: say so, so that torchrun / accelerate launch on CPU give real multi-process (gloo) DDP.
    cpu = not torch.cuda.is_available()
    return Accelerator(
        cpu=cpu, gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision,
        log_with=cfg.log_with or None,
        project_config=ProjectConfiguration(project_dir=cfg.out, logging_dir=os.path.join(cfg.out, "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)],
    )


def _make_optimizer(cfg: TrainConfig, params: list):
    kwargs = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise RuntimeError("--use-8bit-adam needs bitsandbytes (pip install bitsandbytes; CUDA GPUs only)") from exc
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def _adopt_speed_buckets(model, report, stage: str) -> None:
    """The model records the speed buckets its speed layers were trained with (stage speed), so
    that ``EMOPipeline`` encodes the target speed the same way; a mismatch with a model whose
    speed layers were trained on other buckets is an error."""
    have = model.config.speed_centers
    centers, radii = report.speed_centers, report.speed_radii
    same = have is not None and np.allclose(have, centers) and np.allclose(model.config.speed_radii, radii)
    if stage == "speed":
        if have is not None and not same:
            raise DataContractError(
                f"the model's speed layers were trained with bucket centres {list(have)}, the shards have {centers}: "
                "train on shards with the model's buckets (emo-data build --config with those speed centres/radii, "
                "or fit-buckets --apply on the original corpus)")
        if have is None:
            model.register_to_config(speed_centers=[float(c) for c in centers], speed_radii=[float(r) for r in radii])
    elif have is not None and not same:
        logger.warning("the model's speed layers were trained with centres %s; these shards have %s (not used in stage %s)",
                       list(have), centers, stage)


def _rewrite_metrics(path: str, upto_step: int) -> None:
    """Resuming at ``upto_step``: drop logged steps after it (the killed run may have logged some)."""
    if not os.path.isfile(path):
        return
    with open(path) as fh:
        lines = [ln for ln in fh if ln.strip() and json.loads(ln).get("step", 0) <= upto_step]
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        fh.writelines(lines)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- loop
def train(cfg: TrainConfig, components: Optional[Components] = None) -> dict:
    """Run stage ``cfg.stage`` up to ``cfg.steps`` optimizer steps (resuming when ``cfg.resume``).

    Returns ``{"losses": [...per step run here...], "step": final step, "start_step": step resumed
    from, "trainable": n, "checkpoint": last checkpoint dir, "contract": summary}``."""
    from tqdm import tqdm

    if cfg.use_8bit_adam:  # fail before loading anything
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("--use-8bit-adam needs bitsandbytes (pip install bitsandbytes; CUDA GPUs only)") from exc
    accelerator = _make_accelerator(cfg)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and world == 1 and "WORLD_SIZE" not in os.environ:
        logger.warning("`accelerate launch --cpu` starts one process (accelerate runs several CPU processes only through "
                       "mpirun, --mpirun_hostfile). For N processes on CPU use `torchrun --nproc_per_node N -m "
                       "emo_model.training ...` or `accelerate launch --multi_gpu --num_processes N ...` (without GPUs "
                       "this trainer runs them on CPU with gloo)")
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if not cfg.shards:
        raise ValueError("no --shards")
    resume_dir = ckpt.resolve_resume(cfg.out, cfg.resume)
    if main:
        os.makedirs(cfg.out, exist_ok=True)
        ckpt.remove_stale(cfg.out)
        cfg.save(os.path.join(cfg.out, "train_config.json"))
    accelerator.wait_for_everyone()
    resume_state = ckpt.read_state(resume_dir) if resume_dir else None
    if resume_state and resume_state.get("stage") != cfg.stage:
        raise ValueError(f"--resume {resume_dir} is a stage-{resume_state.get('stage')} checkpoint, this run is stage {cfg.stage}")

    # --- model and frozen parts
    if components is None:
        samplable = resume_dir and os.path.isfile(os.path.join(resume_dir, "model_index.json"))
        components = load_components(cfg, source=resume_dir if samplable else None)
    model, vae = components.model, components.vae
    if resume_dir:
        from safetensors.torch import load_file

        from .model import EMOModel

        saved = EMOModel.load_config(os.path.join(resume_dir, "emo"))
        model.load_state_dict(load_file(os.path.join(resume_dir, "emo", "diffusion_pytorch_model.safetensors")))
        if saved.get("speed_centers") is not None:
            model.register_to_config(speed_centers=saved["speed_centers"], speed_radii=saved["speed_radii"])
    elif cfg.motion_module:
        report = model.load_motion_module(cfg.motion_module)
        logger.info("motion module %s: %d tensors loaded", cfg.motion_module, report["loaded"])
    vae.requires_grad_(False)
    vae.eval()
    noise_scheduler = components.noise_scheduler
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    size = cfg.resolution or int(model.config.sample_size) * vae_scale

    # --- data contract
    refs = load_catalog(expand_shards(cfg.shards))
    fingerprint = None
    if components.vae_dir and cfg.use_latents != "no":
        from emo_data.latents import vae_fingerprint

        fingerprint = vae_fingerprint(components.vae_dir)
    report = check_contract(refs, model.config, cfg.stage, size, cfg.use_latents, fingerprint)
    _adopt_speed_buckets(model, report, cfg.stage)
    if main:
        logger.info("data: %s", report.summary())
    val_samples = []
    if cfg.val_every:
        if components.audio_encoder is None:
            raise ValueError("--val-every needs an audio encoder: pass --audio-encoder DIR (or a --model pipeline directory)")
        if not cfg.val_shards:
            raise ValueError("--val-every needs --val-shards (held-out test-split shards)")
        if main:
            from .train_data import load_validation_samples

            val_samples = load_validation_samples(load_catalog(expand_shards(cfg.val_shards)), cfg.val_samples,
                                                  cfg.val_frames, size)

    # --- what trains
    designed = trainable_parameter_names(model, cfg.stage, cfg.freeze_spatial)
    reachable = reachable_parameter_names(model.config, cfg.stage)
    names = [n for n in designed if n in reachable]
    dropped = sorted(set(designed) - reachable)
    if dropped and main:
        logger.info("not training %d parameters that get no gradient in stage %s (e.g. %s)", len(dropped), cfg.stage, dropped[:2])
    name_set = set(names)
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in name_set)
        if name in name_set:
            params.append(p)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()

    # --- optimisation
    from diffusers.optimization import get_scheduler

    optimizer = _make_optimizer(cfg, params)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.steps, num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    if device.type == "cuda" and weight_dtype != torch.float32:
        vae.to(device, dtype=weight_dtype)  # frozen: encode in the training precision
    else:
        vae.to(device)
    ema = None
    if cfg.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=cfg.ema_warmup)
        ema.to(device)

    # --- state: fresh or resumed
    generator = torch.Generator().manual_seed(_seed(cfg.seed, 1, rank))
    step, micro_batches, start_items = 0, 0, None
    if resume_dir:
        state = ckpt.load_training_state(resume_dir, optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema,
                                         trainable_names=names, device=device)
        step, micro_batches = int(state["step"]), int(state["micro_batches"])
        data = state["data"]
        if data["world_size"] == world and data["num_workers"] == cfg.num_workers:
            start_items = data["items_per_stream"]
        else:  # another layout: continue at the same share of the data, not the same items
            consumed = micro_batches * data["batch_size"] * data["world_size"]
            per_stream = consumed // (world * max(cfg.num_workers, 1))
            start_items = [per_stream] * max(cfg.num_workers, 1)
            logger.warning("resuming with %d processes x %d workers (checkpoint: %d x %d): the data continues at the same "
                           "share of each epoch, not at exactly the same samples", world, cfg.num_workers,
                           data["world_size"], data["num_workers"])
        rng = ckpt.load_rng(resume_dir, rank)
        if rng is not None and data["world_size"] == world:
            ckpt.restore_rng(rng, generator)
        else:
            logger.warning("no random state for rank %d in %s: reseeding from (seed, step)", rank, resume_dir)
            generator.manual_seed(_seed(cfg.seed, 1, rank, step))
        if main:
            logger.info("resumed from %s at step %d", resume_dir, step)
    else:
        random.seed(_seed(cfg.seed, 2, rank))
        np.random.seed(_seed(cfg.seed, 3, rank) % 2**32)
        torch.manual_seed(_seed(cfg.seed, 4, rank))

    maker = ItemMaker(cfg.stage, size, int(raw_model.config.num_motion_frames), int(raw_model.config.num_frames),
                      int(raw_model.config.audio_window), int(raw_model.config.speed_window), report.use_latents)
    layout = StreamLayout(seed=cfg.seed, rank=rank, world_size=world, num_workers=cfg.num_workers,
                          start_items=list(start_items or []), first_batch=micro_batches)
    stream = ShardStream(report.usable, maker, layout, shuffle_buffer=cfg.shuffle_buffer,
                         shard_shuffle=cfg.shard_shuffle, resampled=cfg.resampled)
    loader = make_loader(stream, cfg.batch_size)
    latent_scale = report.latents["scaling_factor"] if report.use_latents else None

    # --- logging
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if main:
        _rewrite_metrics(metrics_path, step)
    if cfg.log_with:
        accelerator.init_trackers(
            "emo-train", config={k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.to_dict().items()},
            init_kwargs={"tensorboard": {"purge_step": step + 1}} if step and "tensorboard" in cfg.log_with else {},
        )
    components_dir = None
    if main:
        components_dir = ckpt.write_components(cfg.out, vae, components.audio_encoder, components.feature_extractor,
                                               components.sample_scheduler)
    samples_per_step = cfg.batch_size * cfg.grad_accum * world
    bar = tqdm(total=cfg.steps, initial=step, unit="step", disable=not (main and cfg.progress), dynamic_ncols=True)
    losses, last_checkpoint, start_step = [], None, step
    if resume_dir:
        last_checkpoint = resume_dir
    it = iter(loader)
    t_last = time.perf_counter()
    try:
        while step < cfg.steps:
            micro_losses = []
            grad_norm = torch.tensor(float("nan"))
            for _ in range(cfg.grad_accum):
                batch = next(it)
                micro_batches += 1
                with accelerator.accumulate(model):
                    loss = training_loss(model, vae, noise_scheduler, batch, cfg.stage, cfg, generator,
                                         config=raw_model.config, latent_scale=latent_scale)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                micro_losses.append(loss.detach())
            if not accelerator.sync_gradients:
                raise RuntimeError("gradient accumulation out of step with accelerate")
            if not accelerator.optimizer_step_was_skipped:
                lr_scheduler.step()
            if ema is not None:
                ema.step(params)
            step += 1
            loss_mean = accelerator.reduce(torch.stack(micro_losses).mean().to(device), reduction="mean").item()
            now = time.perf_counter()
            record = {"step": step, "loss": loss_mean, "lr": lr_scheduler.get_last_lr()[0],
                      "grad_norm": float(grad_norm), "samples_per_s": samples_per_step / max(now - t_last, 1e-9)}
            t_last = now
            losses.append(loss_mean)
            if main:
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{record['lr']:.2e}")
                if step % cfg.log_every == 0 or step == 1:
                    logger.info("stage %s step %d loss %.4f lr %.3g grad-norm %.3g %.1f samples/s", cfg.stage, step,
                                loss_mean, record["lr"], record["grad_norm"], record["samples_per_s"])
            if cfg.log_with:
                accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)

            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                last_checkpoint = _save(accelerator, cfg, step, micro_batches, raw_model, optimizer, lr_scheduler, ema,
                                        names, params, generator, stream.items_per_stream(micro_batches, cfg.batch_size), report,
                                        components_dir)
            if cfg.val_every and step % cfg.val_every == 0:
                if main:
                    _validate(accelerator, cfg, step, raw_model, vae, components, val_samples, ema, params, weight_dtype)
                accelerator.wait_for_everyone()
    finally:
        bar.close()
        del it
    accelerator.end_training()
    return {"losses": losses, "step": step, "start_step": start_step, "trainable": sum(p.numel() for p in params),
            "checkpoint": last_checkpoint, "contract": report.summary()}


def _save(accelerator, cfg, step, micro_batches, raw_model, optimizer, lr_scheduler, ema, names, params, generator,
          items, report, components_dir) -> Optional[str]:
    from accelerate.utils import gather_object

    rng_states = gather_object([ckpt.capture_rng(generator)])
    items_all = gather_object([items])
    checksum = torch.stack([p.detach().float().sum() for p in params]).sum().item()
    checksums = gather_object([checksum])
    in_sync = all(c == checksums[0] for c in checksums)
    if not in_sync:
        raise RuntimeError(f"the processes' weights differ at step {step} (checksums {checksums}): DDP is not synchronising")
    path = None
    if accelerator.is_main_process:
        state = {
            "step": step, "stage": cfg.stage, "micro_batches": micro_batches, "seed": cfg.seed,
            "data": {"world_size": accelerator.num_processes, "num_workers": cfg.num_workers, "batch_size": cfg.batch_size,
                     "grad_accum": cfg.grad_accum, "items_per_stream": items_all[0], "items_per_stream_by_rank": items_all,
                     "resampled": cfg.resampled},
            "ranks_in_sync": in_sync, "weights_checksum": checksums[0], "trainable_tensors": len(names),
            "speed_centers": report.speed_centers, "speed_radii": report.speed_radii, "use_latents": report.use_latents,
        }
        path = ckpt.write_checkpoint(cfg.out, step, model=raw_model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                     ema=ema, trainable_names=names, config=cfg, state=state, rng_states=rng_states,
                                     components=components_dir)
        for removed in ckpt.prune(cfg.out, cfg.keep_checkpoints):
            logger.info("removed %s (--keep-checkpoints %d)", removed, cfg.keep_checkpoints)
    accelerator.wait_for_everyone()
    return path or os.path.join(cfg.out, f"{ckpt.PREFIX}{step}")


def _validate(accelerator, cfg, step, raw_model, vae, components, samples, ema, params, weight_dtype) -> None:
    from .validation import log_sheet, make_pipeline, run_validation

    t0 = time.time()
    if ema is not None:  # validate the EMA weights, then put the trained ones back
        ema.store(params)
        ema.copy_to(params)
    try:
        audio_encoder = components.audio_encoder.to(accelerator.device)
        pipe = make_pipeline(raw_model, vae, audio_encoder, components.feature_extractor, components.sample_scheduler.config)
        result = run_validation(pipe, samples, os.path.join(cfg.out, "validation", f"step-{step}"),
                                num_frames=cfg.val_frames, num_inference_steps=cfg.val_inference_steps,
                                guidance_scale=cfg.val_guidance, seed=cfg.seed,
                                autocast=accelerator.autocast if weight_dtype != torch.float32 else None)
    finally:
        if ema is not None:
            ema.restore(params)
        raw_model.train()
    log_sheet(accelerator, result["sheet"], step)
    logger.info("validation at step %d: %s (%.1f s)", step, result["contact_sheet"], time.time() - t0)


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="emo-train", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML / JSON file with TrainConfig fields; the flags below override it")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    add_config_arguments(ap)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
    except (ValueError, TypeError) as exc:
        print(f"emo-train: error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    try:
        result = train(cfg)
    except (DataContractError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"emo-train: error: {exc}", file=sys.stderr)
        return 2
    if result["losses"]:
        print(f"stage {cfg.stage}: steps {result['start_step']} -> {result['step']}, {result['trainable'] / 1e6:.2f} M "
              f"trained parameters, last loss {result['losses'][-1]:.4f}; checkpoint {result['checkpoint']}")
    else:
        print(f"stage {cfg.stage}: already at step {result['step']}; checkpoint {result['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
