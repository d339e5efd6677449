"""Expression descriptors for E-FID (FID over per-frame expression features), pluggable.

``landmarks`` (the offline default; **not the paper's E-FID**): iBUG-68 landmarks, similarity-
aligned on rigid points (eye corners, nose bridge) to a canonical frame with inter-ocular distance
1, keeping brows, eyes and mouth (42 points, 84 values); minus the same descriptor of the
reference portrait, so that the identity's face shape cancels (as a 3DMM separates identity from
expression) and what remains is how the face moved away from the reference. Out-of-plane head
rotation is not removed; values are not comparable with the paper's 3DMM E-FID.

``deep3d``: the paper's kind: the 64 expression coefficients of Deep3DFaceRecon_pytorch's
ResNet-50 regressor (``net_recon``; 257 coefficients, id 80 | exp 64 | tex 80 | angle 3 |
gamma 27 | trans 3), from a local checkpoint, on 224 x 224 crops aligned like theirs (5 points
from the 68 landmarks, least-squares fit of scale and translation to the BFM's standard 3-D
landmarks from ``similarity_Lm3D_all.mat``, rescale factor 102).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .weights import WeightsInfo, load_into, load_tensors, weights_info

# iBUG-68 indices
RIGID = np.array([27, 28, 29, 30, 36, 39, 42, 45])            # nose bridge + eye corners
EXPRESSIVE = np.r_[17:27, 36:48, 48:68]                        # brows, eyes, mouth
LEFT_EYE, RIGHT_EYE = np.arange(36, 42), np.arange(42, 48)


def _similarity_to(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity (scale, 2x2 rotation, translation) mapping ``src`` points onto ``dst`` (Umeyama)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(d.T @ s)
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rot = u @ sign @ vt
    scale = float((sig * np.diag(sign)).sum() / max((s ** 2).sum(), 1e-12))
    return scale, rot, mu_d - scale * rot @ mu_s


def canonical_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """[T, 68, 2] -> [T, 68, 2] aligned: eye centres at (-0.5, 0) and (0.5, 0) for an upright face,
    fitted on the rigid points so that mouth and brow motion do not move the frame."""
    lm = np.asarray(landmarks, np.float64)
    out = np.empty_like(lm)
    # canonical rigid template from the first frame: rotate/scale so the eyes are level, IOD = 1
    ref = lm[0]
    le, re = ref[LEFT_EYE].mean(0), ref[RIGHT_EYE].mean(0)
    iod = np.linalg.norm(re - le) or 1.0
    ang = np.arctan2(re[1] - le[1], re[0] - le[0])
    c, s = np.cos(-ang), np.sin(-ang)
    rot0 = np.array([[c, -s], [s, c]])
    template = ((ref - (le + re) / 2) @ rot0.T) / iod
    for t in range(len(lm)):
        scale, rot, shift = _similarity_to(lm[t][RIGID], template[RIGID])
        out[t] = lm[t] @ (scale * rot).T + shift
    return out


class LandmarkExpression:
    name = "landmarks"
    label = "offline landmark expression descriptor (dlib 68 points; NOT the paper's 3DMM E-FID)"
    dim = 2 * len(EXPRESSIVE)

    def __init__(self):
        self.weights: list[WeightsInfo] = []  # the dlib predictor's file is reported by the face pass

    def extract(self, frames: np.ndarray, landmarks: np.ndarray, reference: np.ndarray,
                reference_landmarks: np.ndarray) -> np.ndarray:
        both = canonical_landmarks(np.concatenate([reference_landmarks[None], landmarks], axis=0))
        feats = both[:, EXPRESSIVE].reshape(len(both), -1)
        return (feats[1:] - feats[0]).astype(np.float64)


# --------------------------------------------------------------------------- Deep3DFaceRecon
COEFF_SPLITS = {"id": (0, 80), "exp": (80, 144), "tex": (144, 224), "angle": (224, 227), "gamma": (227, 254), "trans": (254, 257)}
_HEAD_DIMS = (80, 64, 80, 3, 27, 2, 1)


def five_points(landmarks68: np.ndarray) -> np.ndarray:
    """Deep3DFaceRecon's 5 points from 68: eye centres, nose tip, mouth corners (their order)."""
    lm = np.asarray(landmarks68, np.float64)
    return np.stack([(lm[36] + lm[39]) / 2, (lm[42] + lm[45]) / 2, lm[30], lm[48], lm[54]])


def load_lm3d(path: str) -> np.ndarray:
    """The 5 standard 3-D landmarks from ``similarity_Lm3D_all.mat`` (68 x 3), in their order."""
    from scipy.io import loadmat

    lm = np.asarray(loadmat(path)["lm"], np.float64)
    if lm.shape != (68, 3):
        raise ValueError(f"{path}: 'lm' is {lm.shape}, expected (68, 3)")
    return np.stack([(lm[36] + lm[39]) / 2, (lm[42] + lm[45]) / 2, lm[30], lm[48], lm[54]])


def pos_fit(points2d: np.ndarray, points3d: np.ndarray) -> tuple[np.ndarray, float]:
    """Translation and scale of a weak-perspective projection of ``points3d`` onto ``points2d``
    (least squares; Deep3DFaceRecon's ``POS``)."""
    n = len(points2d)
    a = np.zeros((2 * n, 8))
    a[0::2, 0:3], a[0::2, 3] = points3d, 1
    a[1::2, 4:7], a[1::2, 7] = points3d, 1
    k = np.linalg.lstsq(a, points2d.reshape(-1), rcond=None)[0]
    scale = (np.linalg.norm(k[0:3]) + np.linalg.norm(k[4:7])) / 2
    return np.array([k[3], k[7]]), float(scale)


def align_crop(image: np.ndarray, landmarks68: np.ndarray, lm3d: np.ndarray, target: int = 224,
               rescale_factor: float = 102.0) -> np.ndarray:
    """Deep3DFaceRecon's ``align_img`` crop: [224, 224, 3] uint8."""
    from PIL import Image

    h0, w0 = image.shape[:2]
    lm5 = five_points(landmarks68)
    lm5[:, 1] = h0 - 1 - lm5[:, 1]  # their landmarks count y upwards
    t, s = pos_fit(lm5, lm3d)
    s = rescale_factor / s
    w, h = int(w0 * s), int(h0 * s)
    left = int(w / 2 - target / 2 + float((t[0] - w0 / 2) * s))
    up = int(h / 2 - target / 2 + float((h0 / 2 - t[1]) * s))
    img = Image.fromarray(image).resize((w, h), resample=Image.BICUBIC)
    return np.asarray(img.crop((left, up, left + target, up + target)))


def _deep3d_network():
    import torch
    import torch.nn as nn

    try:
        from torchvision.models import resnet50
    except ImportError as exc:
        raise ImportError("the deep3d expression extractor needs torchvision: pip install 'emo[eval]'") from exc

    class ReconNet(nn.Module):
        """ResNet-50 without its fc + seven 1x1 heads (Deep3DFaceRecon's ``ReconNetWrapper``)."""

        def __init__(self):
            super().__init__()
            self.backbone = resnet50(weights=None)
            self.backbone.fc = nn.Identity()  # their backbone has no fc (use_last_fc=False)
            self.final_layers = nn.ModuleList([nn.Conv2d(2048, d, 1, bias=True) for d in _HEAD_DIMS])

        def forward(self, x):
            b = self.backbone
            x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
            x = b.avgpool(b.layer4(b.layer3(b.layer2(b.layer1(x)))))
            return torch.cat([layer(x) for layer in self.final_layers], dim=1).flatten(1)

    return ReconNet()


class Deep3DExpression:
    name = "deep3d"
    label = "3DMM expression coefficients (Deep3DFaceRecon_pytorch net_recon, 64-d), as the paper's E-FID"
    dim = 64

    def __init__(self, weights_path: Optional[str], lm3d_path: Optional[str], device: str = "cpu", batch_size: int = 16):
        import torch

        info = weights_info(weights_path, "Deep3DFaceRecon (E-FID)")
        lm3d_info = weights_info(lm3d_path, "BFM standard landmarks similarity_Lm3D_all.mat (E-FID)")
        self.weights = [info, lm3d_info]
        self.lm3d = load_lm3d(lm3d_info.path)
        state = load_tensors(info.path, subkey="net_recon")
        self.model = _deep3d_network()
        state = {k: v for k, v in state.items() if not k.startswith("backbone.fc.")}
        load_into(self.model, state, info.path)
        self.model.to(device).eval()
        self.device, self.batch_size, self._torch = device, int(batch_size), torch

    def coefficients(self, crops: np.ndarray) -> np.ndarray:
        torch = self._torch
        out = []
        with torch.no_grad():
            for i in range(0, len(crops), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(crops[i:i + self.batch_size])).permute(0, 3, 1, 2).float() / 255.0
                out.append(self.model(x.to(self.device)).double().cpu().numpy())
        return np.concatenate(out, axis=0)

    def extract(self, frames: np.ndarray, landmarks: np.ndarray, reference: np.ndarray,
                reference_landmarks: np.ndarray) -> np.ndarray:
        crops = np.stack([align_crop(f, lm, self.lm3d) for f, lm in zip(frames, landmarks)])
        lo, hi = COEFF_SPLITS["exp"]
        return self.coefficients(crops)[:, lo:hi]


def random_deep3d_state(seed: int = 0) -> dict:
    """Random ``net_recon`` weights with the real keys (tests, demos)."""
    import torch

    torch.manual_seed(seed)
    net = _deep3d_network()
    with torch.no_grad():
        for layer in net.final_layers:
            torch.nn.init.normal_(layer.weight, std=0.05)
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


def make_expression_extractor(name: str, weights_path: Optional[str] = None, lm3d_path: Optional[str] = None,
                              device: str = "cpu"):
    if name == "landmarks":
        return LandmarkExpression()
    if name == "deep3d":
        return Deep3DExpression(weights_path, lm3d_path, device=device)
    raise ValueError(f"unknown expression extractor {name!r} (landmarks | deep3d)")
