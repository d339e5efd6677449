"""FID features: torch-fidelity's InceptionV3 (the TF-FID network, 2048-d pool3 features).

torch-fidelity (also the feature extractor behind torchmetrics' FID) reproduces the TensorFlow
FID graph, including TF1's bilinear resize to 299 x 299. Its weights file is the converted
``inception-2015-12-05`` graph; pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` has the
same keys and shapes, so either file (or a safetensors copy) can be given.

torch-fidelity reads a weights path with ``torch.load(weights_only=False)``, which would run code
from the file. We never hand it the user's file: the tensors are read safely
(:func:`~emo_model.eval.weights.load_tensors`) and re-serialised in memory from plain tensors,
and that in-memory copy is what torch-fidelity loads.
"""
from __future__ import annotations

import io
from typing import Optional

import numpy as np

from .weights import WeightsInfo, load_tensors, weights_info

FEATURE = "2048"


def _torch_fidelity_class():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as exc:
        raise ImportError(
            "FID needs torch-fidelity (and torchvision): pip install 'emo[eval]'") from exc
    return FeatureExtractorInceptionV3


def _in_memory_state(state: dict) -> io.BytesIO:
    import torch

    buf = io.BytesIO()
    torch.save({k: v.contiguous() for k, v in state.items()}, buf)
    buf.seek(0)
    return buf


class InceptionFeatures:
    """Loads the network once; ``features(frames)`` -> ``[N, 2048]`` float64.

    ``feature``: torch-fidelity's feature name; FID uses "2048" (pool3). "64" / "192" / "768" are
    earlier layers (the network stops there), used by the tests to compare Fréchet distances
    with pytorch-fid's on real features cheaply."""

    def __init__(self, weights_path: Optional[str], device: str = "cpu", batch_size: int = 16, feature: str = FEATURE):
        import torch

        self.info: WeightsInfo = weights_info(weights_path, "Inception (FID)")
        state = load_tensors(self.info.path)
        cls = _torch_fidelity_class()
        self.feature = str(feature)
        self.model = cls("inception-v3-compat", [self.feature], feature_extractor_weights_path=_in_memory_state(state))
        self.model.to(device).eval()
        self.device = device
        self.batch_size = int(batch_size)
        self._torch = torch

    def features(self, frames: np.ndarray) -> np.ndarray:
        """``[N, H, W, 3]`` uint8 RGB (any size; resized to 299 inside) -> ``[N, 2048]``."""
        torch = self._torch
        out = []
        with torch.no_grad():
            for i in range(0, len(frames), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(frames[i:i + self.batch_size])).permute(0, 3, 1, 2)
                feats = self.model(x.to(self.device))
                feats = feats[0] if isinstance(feats, (tuple, list)) else feats
                out.append(feats.reshape(len(x), -1).double().cpu().numpy())
        return np.concatenate(out, axis=0) if out else np.zeros((0, int(self.feature)))


def random_inception_state(seed: int = 0) -> dict:
    """A random-weight state dict with the real network's keys (tests, demos).

    He-normal convolutions and unit batch-norm statistics keep activations at a useful scale
    through the 94 layers (PyTorch's default init shrinks them to ~1e-6)."""
    import torch

    cls = _torch_fidelity_class()

    class _Architecture(cls):  # build the layers only: nothing to load yet
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    torch.manual_seed(seed)
    net = _Architecture("inception-v3-compat", [FEATURE], feature_extractor_weights_path=_in_memory_state({}))
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.weight.fill_(1.0)
                module.bias.zero_()
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
            elif isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=0.01)
                torch.nn.init.zeros_(module.bias)
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
