"""Check that emo-eval's I3D (emo_model/eval/i3d.py) computes what the widely used PyTorch port does.

    python bench/eval_i3d_reference.py /path/to/pytorch-i3d/pytorch_i3d.py [--weights rgb_imagenet.pt]

Loads the same state dict (random weights with the real keys, or the given file) into both
networks and compares our time-averaged logits with the port's ``forward`` averaged over time,
for 16- and 32-frame clips at 224 x 224. The port's file is imported from the path you give
(it is not a package); nothing is downloaded. Measured 2026-12 with random weights: max |diff| 0.0
at 16 and 32 frames (bit-identical).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference", help="path to piergiaj/pytorch-i3d's pytorch_i3d.py")
    ap.add_argument("--weights", default=None, help="a state dict both load (default: random weights)")
    args = ap.parse_args(argv)

    from emo_model.eval.i3d import InceptionI3d, random_i3d_state
    from emo_model.eval.weights import load_tensors

    spec = importlib.util.spec_from_file_location("pytorch_i3d_reference", args.reference)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    state = load_tensors(args.weights) if args.weights else random_i3d_state(3)
    ours = InceptionI3d()
    ours.load_state_dict({**ours.state_dict(), **state})
    ref = module.InceptionI3d(num_classes=400, in_channels=3)
    missing, unexpected = ref.load_state_dict({k: v for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        print(f"key mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return 1
    ours.eval(), ref.eval()
    torch.manual_seed(0)
    worst = 0.0
    for frames in (16, 32):
        x = torch.rand(1, 3, frames, 224, 224) * 2 - 1
        with torch.no_grad():
            diff = (ours(x) - ref(x).mean(dim=2)).abs().max().item()
        worst = max(worst, diff)
        print(f"{frames} frames: max |ours - reference| = {diff:.3g}")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
