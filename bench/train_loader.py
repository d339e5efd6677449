"""Training-loader throughput: ``emo_model.train_data`` against a plain tar read + decode of the same windows.

    python bench/train_loader.py --synthetic 8 --frames 60     # fixture shards from real 512x512 footage
    python bench/train_loader.py /data/emo/train-00000{0..3}.tar --vae /models/sd15/vae

For each stage (image: 2 frames per sample; video: 4 + 12 frames + reference) ``--epochs`` epochs are read
three ways, interleaved ``--repeat`` times in one process (best time of each is reported):

* ``loader``: ``ShardStream`` through a ``DataLoader`` (``--workers``, default 0 = in-process),
  exactly as ``emo-train`` builds it: seeded order, byte-range member reads, mp4 decoded from the
  keyframe up to the last needed frame, RGB only for the needed frames, resize, windows.
* ``plain``: every shard read once in tar order (``emo_data.shards.iter_raw_samples``, what a
  streaming WebDataset pipeline does), each sample decoded with ``emo_data.shards.decode_mp4`` up
  to the last frame of *the same window the loader chose*, the same frames picked, resized,
  the same members decoded. The target is loader >= 0.8 x plain.
* ``latents``: the loader with pre-encoded ``latents.npy`` (``emo-data add-latents``; default VAE:
  a tiny random one, which changes nothing for reading) instead of video decoding.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def make_synthetic(root: str, n: int, frames: int, per_shard: int) -> list[str]:
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from emo_data.shards import write_tar

    import shard_fixtures as fx

    os.makedirs(root, exist_ok=True)
    paths = []
    for s in range(0, n, per_shard):
        samples = [fx.make_sample(i, frames, True, source_id=f"src{i:03d}", seed=i) for i in range(s, min(n, s + per_shard))]
        path = os.path.join(root, f"train-{s // per_shard:06d}.tar")
        write_tar(path, samples, extra_index=fx.fixture_index(samples[0][2]["crop_size"]))
        paths.append(path)
    return paths


class ModelConfig:
    """What the data contract reads from a model config, taken from the shards themselves."""

    def __init__(self, meta):
        audio = meta.audio_emb or {}
        self.speed_buckets = len(meta.speed_centers)
        self.audio_layers, self.audio_feature_dim = audio.get("num_layers", 0), audio.get("dim", 0)
        self.num_motion_frames, self.num_frames, self.audio_window, self.speed_window = 4, 12, 2, 2
        self.in_channels = 4


def loader_epoch(refs, stage: str, size: int, latents: bool, workers: int, seed: int = 0, epochs: int = 1):
    """``epochs`` epochs through the training DataLoader (its start-up included); returns (seconds,
    the windows it produced)."""
    from emo_model.train_data import ItemMaker, ShardStream, StreamLayout, make_loader

    maker = ItemMaker(stage, size, 4, 12, 2, 2, use_latents=latents)
    stream = ShardStream(refs, maker, StreamLayout(seed=seed, num_workers=workers), shuffle_buffer=16)
    windows = []
    t0 = time.perf_counter()
    it = iter(make_loader(stream, batch_size=1))
    for _ in range(len(refs) * epochs):
        windows.append(tuple(next(it)["window"][0].tolist()))
    elapsed = time.perf_counter() - t0
    del it
    return elapsed, windows


def chosen_windows(refs, stage: str, size: int, seed: int = 0, epochs: int = 1) -> list:
    """Per epoch, key -> (start or target frame, reference frame) as the loader picks them: a pure
    function of (seed, epoch, position), whatever the number of workers."""
    from emo_model.train_data import ItemMaker, ShardStream, StreamLayout

    maker = ItemMaker(stage, size, 4, 12, 2, 2)
    stream = ShardStream(refs, maker, StreamLayout(seed=seed), shuffle_buffer=16)
    out = [dict() for _ in range(epochs)]
    for _, (entropy, idx) in zip(range(len(refs) * epochs), stream.indices(0)):
        out[entropy[2]][refs[idx].key] = maker.choose(refs[idx].num_frames, np.random.default_rng(list(entropy)))
    return out


def plain_epoch(shards, refs, stage: str, size: int, chosen: dict) -> float:
    """Tar order, whole-member reads, decode_mp4 up to the chosen window's last frame."""
    import torch

    from emo_data.latents import resize_frames
    from emo_data.shards import decode_mp4, iter_raw_samples, load_npy, load_png
    from emo_model.train_data import resize_mask, window_indices

    t0 = time.perf_counter()
    for shard in shards:
        for raw in iter_raw_samples(shard):
            if raw["__key__"] not in chosen:
                continue
            a, r = chosen[raw["__key__"]]
            ids = [a] if stage == "image" else list(range(a, a + 16))
            frames = decode_mp4(raw["mp4"], max_frames=max(ids + [r]) + 1)[ids + [r]]
            pix = torch.from_numpy(np.ascontiguousarray(resize_frames(frames, size))).permute(0, 3, 1, 2)
            mask = torch.from_numpy(resize_mask(load_png(raw["face_mask.png"]), size))
            if stage != "image":
                audio = load_npy(raw["audio_emb.npy"])
                speed = load_npy(raw["speed_buckets.npy"])
                total = len(speed)
                _ = torch.from_numpy(audio[window_indices(a + 4, a + 16, 2, total)])
                _ = torch.from_numpy(speed[window_indices(a, a + 16, 2, total)])
            del pix, mask
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shards", nargs="*")
    ap.add_argument("--synthetic", type=int, default=0, help="build this many fixture samples (512x512, real footage)")
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--per-shard", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=512, help="training resolution (512: no resize)")
    ap.add_argument("--vae", help="AutoencoderKL directory for the latents run (default: a tiny random VAE)")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3, help="epochs per measurement (plain: the shards re-read per epoch)")
    ap.add_argument("--keep", help="keep the synthetic / latents shards in this directory")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from emo_data.latents import add_latents
    from emo_model.train_data import check_contract, load_catalog

    tmp = args.keep or tempfile.mkdtemp(prefix="emo_loader_bench_")
    os.makedirs(tmp, exist_ok=True)
    try:
        shards = args.shards
        if args.synthetic and args.keep and os.path.isdir(os.path.join(tmp, "video")):
            shards = sorted(os.path.join(tmp, "video", f) for f in os.listdir(os.path.join(tmp, "video")) if f.endswith(".tar"))
            print(f"reusing {len(shards)} shards in {tmp}/video")
        elif args.synthetic:
            t = time.perf_counter()
            shards = make_synthetic(os.path.join(tmp, "video"), args.synthetic, args.frames, args.per_shard)
            print(f"built {args.synthetic} samples x {args.frames} frames in {len(shards)} shards ({time.perf_counter() - t:.1f} s)")
        vae = args.vae
        if not vae:
            from diffusers import AutoencoderKL

            from emo_model.tiny import tiny_vae_config

            torch.manual_seed(0)
            vae = os.path.join(tmp, "tiny_vae")
            AutoencoderKL(**tiny_vae_config()).save_pretrained(vae)
        lat_dir = os.path.join(tmp, "latents")
        os.makedirs(lat_dir, exist_ok=True)
        lat_shards = []
        from emo_data.shards import index_path_for

        for s in shards:
            d = os.path.join(lat_dir, os.path.basename(s))
            if not os.path.exists(d):
                shutil.copy2(s, d)
                shutil.copy2(index_path_for(s), index_path_for(d))
            lat_shards.append(d)
        have = [(r.meta.latents or {}).get("resolution") for r in load_catalog(lat_shards)]
        if all(h == args.resolution for h in have):
            print(f"latents at {args.resolution} px already present")
        else:
            t = time.perf_counter()
            add_latents(lat_shards, vae, resolution=args.resolution, progress=False)
            print(f"add-latents at {args.resolution} px: {time.perf_counter() - t:.1f} s")

        refs_all = load_catalog(shards)
        lat_refs_all = load_catalog(lat_shards)
        config = ModelConfig(refs_all[0].meta)
        mp4_bytes = sum(r.members["mp4"][1] for r in refs_all) / len(refs_all)
        lat_bytes = sum(r.members["latents.npy"][1] for r in lat_refs_all) / len(lat_refs_all)
        print(f"{len(refs_all)} samples of {refs_all[0].num_frames} frames at {refs_all[0].meta.crop_size} px; "
              f"mp4 {mp4_bytes / 1e6:.2f} MB, latents.npy {lat_bytes / 1e6:.2f} MB per sample; "
              f"{args.workers} DataLoader workers; {args.epochs} epochs, best of {args.repeat}")
        for stage in ("image", "video"):
            refs = check_contract(refs_all, config, stage, args.resolution, "no").usable
            lat_refs = check_contract(lat_refs_all, config, stage, args.resolution, "yes").usable
            best = {"loader": 1e9, "plain": 1e9, "latents": 1e9}
            chosen = chosen_windows(refs, stage, args.resolution, epochs=args.epochs)
            for _ in range(args.repeat):
                elapsed, windows = loader_epoch(refs, stage, args.resolution, False, args.workers, epochs=args.epochs)
                assert sorted(windows) == sorted(w for c in chosen for w in c.values()), "plain must decode the loader's windows"
                best["loader"] = min(best["loader"], elapsed)
                best["plain"] = min(best["plain"], sum(plain_epoch(shards, refs, stage, args.resolution, c) for c in chosen))
                best["latents"] = min(best["latents"], loader_epoch(lat_refs, stage, args.resolution, True, args.workers,
                                                                    epochs=args.epochs)[0])
            n = len(refs) * args.epochs
            rate = {k: n / v for k, v in best.items()}
            print(f"stage {stage:5s}: loader {rate['loader']:7.1f} samples/s | plain tar + decode {rate['plain']:7.1f} samples/s"
                  f" | loader/plain {rate['loader'] / rate['plain']:.2f} | with latents {rate['latents']:7.1f} samples/s"
                  f" ({rate['latents'] / rate['loader']:.1f}x the video loader)")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
