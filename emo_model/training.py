"""EMO training, three stages (paper §3.3; all 512 x 512, learning rate 1e-5), from WebDataset shards.

1. ``image``: backbone + ReferenceNet + face locator. The backbone denoises one frame (temporal
   modules skipped), the ReferenceNet sees a different random frame of the same clip.
2. ``video``: + temporal modules and audio layers. n + f = 4 + 12 consecutive frames; the first
   4 are motion frames (through the ReferenceNet), the loss is on the 12 others.
3. ``speed``: only the temporal modules and the speed layers train; audio layers are frozen.

Shards follow :mod:`emo_data.schema` (read with ``emo_data.schema.decode_sample``); stages 2 and 3
need the optional ``audio_emb.npy`` member (samples without it are skipped and counted).

    python -m emo_model.training --stage video --model DIR --shards 'data/train-{000000..000009}.tar' \\
        --out runs/stage2 --steps 30000 --batch-size 4 --mixed-precision bf16 --gradient-checkpointing

``--model`` is an ``EMOPipeline`` directory (its ``vae/`` and ``emo/`` are used) or, with
``--vae``, an ``EMOModel`` directory. Checkpoints are ``EMOModel.save_pretrained`` directories.
Which modules train in stage 2 beyond the temporal and audio layers is not stated in the paper;
here stage 2 also trains the stage-1 modules (``--freeze-spatial`` turns that off).
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .conditioning import window_frames

logger = logging.getLogger(__name__)

STAGES = {"1": "image", "2": "video", "3": "speed", "image": "image", "video": "video", "speed": "speed"}


@dataclass
class TrainConfig:
    stage: str = "video"
    model: str = ""
    vae: Optional[str] = None
    shards: list = field(default_factory=list)
    out: str = "runs/emo"
    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-5
    weight_decay: float = 1e-2
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    resolution: Optional[int] = None  # default: the model's (sample_size x 8)
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    freeze_spatial: bool = False  # stage 2: train only temporal + audio layers
    drop_reference: float = 0.05  # classifier-free guidance dropout
    drop_audio: float = 0.05
    drop_motion: float = 0.1  # zero motion features (teaches the first clip)
    num_workers: int = 2
    seed: int = 0
    save_every: int = 1000
    log_every: int = 10

    def __post_init__(self):
        if str(self.stage) not in STAGES:
            raise ValueError(f"stage {self.stage!r}: choose image/video/speed (1/2/3)")
        self.stage = STAGES[str(self.stage)]


# ----------------------------------------------------------------------------- data
def _resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    if frames.shape[1] == size and frames.shape[2] == size:
        return frames
    import cv2

    return np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in frames])


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    if mask.shape[0] == size:
        return mask
    import cv2

    return cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)


class SampleMaker:
    """Decoded shard sample -> training item for a stage (picklable, runs in DataLoader workers)."""

    def __init__(self, stage: str, size: int, n: int, f: int, m_audio: int, m_speed: int, seed: int = 0):
        self.stage, self.size, self.n, self.f = stage, size, n, f
        self.m_audio, self.m_speed = m_audio, m_speed
        self.rng = random.Random(seed)
        self.skipped = 0

    def __call__(self, sample: dict) -> Optional[dict]:
        from emo_data.schema import decode_mp4

        speed = np.asarray(sample["speed_buckets.npy"], dtype=np.float32)
        total = speed.shape[0]
        mask = _resize_mask(np.asarray(sample["face_mask.png"]), self.size).astype(np.float32) / 255.0
        if self.stage == "image":
            frames = decode_mp4(sample["mp4"])
            t, r = self.rng.randrange(len(frames)), self.rng.randrange(len(frames))
            if len(frames) > 1:
                while r == t:
                    r = self.rng.randrange(len(frames))
            pix = _resize_frames(frames[[t, r]], self.size)
            return {"target": _to_tensor(pix[:1]), "reference": _to_tensor(pix[1:])[0], "mask": torch.from_numpy(mask)[None]}
        if "audio_emb.npy" not in sample:
            self.skipped += 1
            return None
        span = self.n + self.f
        if total < span:
            self.skipped += 1
            return None
        start = self.rng.randrange(total - span + 1)
        frames = decode_mp4(sample["mp4"], max_frames=start + span)
        if len(frames) < start + span:
            self.skipped += 1
            return None
        ref_idx = self.rng.randrange(len(frames))
        pix = _resize_frames(np.concatenate([frames[start : start + span], frames[ref_idx : ref_idx + 1]]), self.size)
        audio = torch.from_numpy(np.asarray(sample["audio_emb.npy"], dtype=np.float32))
        # windows use the clip's real neighbours where they exist (edge-padded at the clip ends)
        audio_w = window_frames(audio[None], self.m_audio, dim=1)[0, start + self.n : start + span]
        speed_w = window_frames(torch.from_numpy(speed)[None], self.m_speed, dim=1)[0, start : start + span]
        return {
            "frames": _to_tensor(pix[:span]),  # [n+f, 3, S, S]
            "reference": _to_tensor(pix[span:])[0],
            "mask": torch.from_numpy(mask)[None],
            "audio": audio_w,  # [f, 2m+1, L, D]
            "speed": speed_w,  # [n+f, 2m+1, d]
        }


def _to_tensor(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def make_dataset(cfg: TrainConfig, maker: SampleMaker, shuffle: int = 64):
    import webdataset as wds
    from emo_data.schema import decode_sample

    ds = wds.WebDataset(cfg.shards, shardshuffle=100 if len(cfg.shards) > 1 else False, nodesplitter=wds.split_by_node,
                        empty_check=False, seed=cfg.seed)
    if shuffle:
        ds = ds.shuffle(shuffle)
    return ds.map(decode_sample).map(maker).select(lambda x: x is not None)


def collate(items: list) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0] if not k.startswith("__")}


# ----------------------------------------------------------------------------- parameters
def trainable_parameter_names(model, stage: str, freeze_spatial: bool = False) -> list[str]:
    """Which of ``model``'s parameters train in ``stage`` (the rest is frozen)."""
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


# ----------------------------------------------------------------------------- one step
def training_loss(model, vae, scheduler, batch: dict, stage: str, cfg: TrainConfig, generator: torch.Generator,
                  config=None) -> torch.Tensor:
    """The denoising loss of one batch (epsilon prediction, MSE on the generated frames).

    ``model`` may be wrapped (DDP): everything, the ReferenceNet pass included, goes through its
    ``forward`` (``reference_latents`` / ``motion_latents``), so gradients are synchronised."""
    config = config or model.config
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    sf = vae.config.scaling_factor

    def encode(pix):  # [N, 3, S, S] -> [N, 4, s, s]
        with torch.no_grad():
            return vae.encode(pix.to(device=device, dtype=vae.dtype)).latent_dist.sample(generator) * sf

    b = batch["reference"].shape[0]
    ref_lat = encode(batch["reference"]).to(dtype)
    mask = batch["mask"].to(device=device, dtype=dtype)
    n = config.num_motion_frames
    if stage == "image":
        target = encode(batch["target"].flatten(0, 1)).to(dtype)[:, :, None]  # [B, 4, 1, s, s]
        motion_lat = None
    else:
        frames = batch["frames"]
        lat = encode(frames.flatten(0, 1)).to(dtype).unflatten(0, (b, frames.shape[1]))  # [B, n+f, 4, s, s]
        motion_lat = lat[:, :n]
        target = lat[:, n:].permute(0, 2, 1, 3, 4)  # [B, 4, f, s, s]
        if cfg.drop_motion and torch.rand((), generator=generator).item() < cfg.drop_motion:
            motion_lat = None
    noise = torch.randn(target.shape, generator=generator).to(device=device, dtype=dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(device)
    noisy = scheduler.add_noise(target, noise, t)
    use_ref = not (cfg.drop_reference and torch.rand((), generator=generator).item() < cfg.drop_reference)
    kwargs = dict(reference_latents=ref_lat, motion_latents=motion_lat, face_mask=mask, use_reference=use_ref)
    if stage == "image":
        kwargs["use_temporal"] = False
    else:
        audio = batch["audio"].to(device=device, dtype=dtype)
        if cfg.drop_audio and torch.rand((), generator=generator).item() < cfg.drop_audio:
            audio = torch.zeros_like(audio)
        kwargs["audio_features"] = audio
        if stage == "speed":
            kwargs["speed_buckets"] = batch["speed"].to(device=device, dtype=dtype)
    pred = model(noisy, t, **kwargs).sample
    if scheduler.config.prediction_type == "v_prediction":
        goal = scheduler.get_velocity(target, noise, t)
    else:
        goal = noise
    return F.mse_loss(pred.float(), goal.float())


# ----------------------------------------------------------------------------- loop
def load_components(cfg: TrainConfig):
    from diffusers import AutoencoderKL, DDPMScheduler

    from .model import EMOModel

    if os.path.isdir(os.path.join(cfg.model, "emo")):
        model = EMOModel.from_pretrained(os.path.join(cfg.model, "emo"))
        vae = AutoencoderKL.from_pretrained(cfg.vae or os.path.join(cfg.model, "vae"))
        sched_dir = os.path.join(cfg.model, "scheduler")
    else:
        if not cfg.vae:
            raise ValueError("--model is an EMOModel directory: pass --vae too")
        model = EMOModel.from_pretrained(cfg.model)
        vae = AutoencoderKL.from_pretrained(cfg.vae)
        sched_dir = None
    if sched_dir and os.path.isdir(sched_dir):
        scheduler = DDPMScheduler.from_pretrained(sched_dir)
    else:
        scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
    return model, vae, scheduler


def train(cfg: TrainConfig, components=None, max_items: Optional[int] = None) -> dict:
    """Run ``cfg.steps`` optimiser steps; returns ``{"losses": [...], "trainable": n, "checkpoint": dir}``."""
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision)
    torch.manual_seed(cfg.seed)
    model, vae, scheduler = components or load_components(cfg)
    vae.requires_grad_(False)
    vae.eval()
    names = set(trainable_parameter_names(model, cfg.stage, cfg.freeze_spatial))
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
        if name in names:
            params.append(p)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    size = cfg.resolution or int(model.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
    maker = SampleMaker(cfg.stage, size, model.config.num_motion_frames, model.config.num_frames,
                        model.config.audio_window, model.config.speed_window, cfg.seed)
    dataset = make_dataset(cfg, maker)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                         collate_fn=collate, drop_last=False)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    vae.to(accelerator.device)
    generator = torch.Generator().manual_seed(cfg.seed)
    raw_model = accelerator.unwrap_model(model)
    losses, step, t0 = [], 0, time.time()

    def batches() -> Iterator[dict]:
        while True:  # epochs
            got = False
            for batch in loader:
                got = True
                yield batch
            if not got:
                raise RuntimeError(f"no usable samples in {cfg.shards} for stage {cfg.stage} "
                                   f"(stages 2/3 need audio_emb.npy and >= {raw_model.config.num_motion_frames + raw_model.config.num_frames} frames)")

    it = batches()
    while step < cfg.steps:
        with accelerator.accumulate(model):
            loss = training_loss(model, vae, scheduler, next(it), cfg.stage, cfg, generator, config=raw_model.config)
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            step += 1
            losses.append(float(loss.detach()))
            if step % cfg.log_every == 0 or step == 1:
                logger.info("stage %s step %d loss %.4f (%.1f s)", cfg.stage, step, losses[-1], time.time() - t0)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                _save(accelerator, raw_model, cfg, f"checkpoint-{step}")
    out = _save(accelerator, raw_model, cfg, "final")
    return {"losses": losses, "trainable": sum(p.numel() for p in params), "checkpoint": out}


def _save(accelerator, model, cfg: TrainConfig, name: str) -> Optional[str]:
    if not accelerator.is_main_process:
        return None
    path = os.path.join(cfg.out, name)
    model.save_pretrained(path, safe_serialization=True)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m emo_model.training", description=__doc__.splitlines()[0])
    ap.add_argument("--stage", required=True, choices=sorted(STAGES))
    ap.add_argument("--model", required=True, help="EMOPipeline dir (vae/, emo/) or EMOModel dir (+ --vae)")
    ap.add_argument("--vae")
    ap.add_argument("--shards", required=True, nargs="+", help="shard urls / brace patterns")
    ap.add_argument("--out", required=True)
    for name, typ in (("steps", int), ("batch-size", int), ("lr", float), ("grad-accum", int), ("resolution", int),
                      ("num-workers", int), ("seed", int), ("save-every", int), ("log-every", int),
                      ("drop-reference", float), ("drop-audio", float), ("drop-motion", float)):
        ap.add_argument(f"--{name}", type=typ, default=None)
    ap.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--freeze-spatial", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    kw = {k: v for k, v in vars(args).items() if v is not None}
    import braceexpand  # webdataset dependency

    kw["shards"] = [u for s in args.shards for u in braceexpand.braceexpand(s)]
    result = train(TrainConfig(**kw))
    print(f"trained {result['trainable'] / 1e6:.1f} M parameters for {len(result['losses'])} steps; "
          f"last loss {result['losses'][-1]:.4f}; saved {result['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
