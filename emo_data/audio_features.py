"""Per-frame wav2vec 2.0 audio features, as EMO's audio layers consume them.

:class:`AudioFeatureStage` maps a clip's waveform (16 kHz mono float32) to an array
``[T, L, D]`` float16: for each of the clip's ``T`` video frames, ``L`` hidden states of a
``transformers.Wav2Vec2Model`` (``output_hidden_states=True``: index 0 is the output of the CNN
feature encoder after projection + positional convolution, index ``i`` the output of transformer
layer ``i``; so ``L = num_hidden_layers + 1`` when ``AudioFeatureConfig.layers`` is ``None``).

Input normalisation follows ``Wav2Vec2FeatureExtractor``: with ``do_normalize`` (read from the
checkpoint's ``preprocessor_config.json``; True when there is none) each clip is scaled to zero
mean and unit variance, ``(x - mean) / sqrt(var + 1e-7)``.

Time alignment (50 Hz -> ``fps``)
---------------------------------
wav2vec 2.0's encoder has a total stride of 320 samples and a receptive field of 400 samples,
so hidden frame ``i`` summarises samples ``[320 i, 320 i + 400)`` and is centred at
``(320 i + 200) / 16000`` s. Video frame ``t`` (shown during ``[t / fps, (t + 1) / fps)``) is
centred at ``(t + 0.5) / fps`` s. Each video frame gets the hidden states linearly interpolated
(over time, per channel) at its centre, i.e. at fractional wav2vec index
``p_t = ((t + 0.5) / fps * 16000 - 200) / 320``, clamped to the first/last wav2vec frame at the
clip edges. The result has exactly ``T`` frames whatever the clip length (2.04 s at 25 fps gives
102 wav2vec frames -> 51 video frames). Interpolation is done in float32, the cast to float16 last.

Clips are processed in one forward pass (the corpus keeps clips <= 10 s).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .config import AudioFeatureConfig
from .shards.contract import SAMPLE_RATE
from .stage import Stage, StageError

__all__ = [
    "AudioFeatureInput",
    "AudioFeatureStage",
    "AudioEncoderUnavailable",
    "check_audio_encoder",
    "wav2vec_frame_positions",
    "resample_frames",
]

W2V_STRIDE = 320       # samples per wav2vec frame (5 * 2**6)
W2V_FIELD = 400        # receptive field of one wav2vec frame, in samples


class AudioEncoderUnavailable(RuntimeError):
    """The wav2vec2 encoder named in AudioFeatureConfig.encoder cannot be loaded."""


@dataclass
class AudioFeatureInput:
    samples: np.ndarray      # [N] float32, mono, at ``sample_rate``
    num_frames: int          # T: number of video frames the features must cover
    fps: float
    sample_rate: int = SAMPLE_RATE


def _unavailable_message(encoder: str, exc: BaseException) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    return (
        f"could not load the wav2vec2 audio encoder {encoder!r} "
        f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r})"
        f"{' with HF_HUB_OFFLINE=1' if offline else ''}. The encoder cannot be loaded offline unless "
        "it is a local copy: save it once where there is network access "
        "(Wav2Vec2Model.from_pretrained('facebook/wav2vec2-base-960h').save_pretrained(DIR), and the "
        "same for Wav2Vec2FeatureExtractor) and pass --audio-encoder /path/to/local/wav2vec2 "
        "(AudioFeatureConfig.encoder), or build without audio features: --no-audio-features."
    )


def _hub_usable(repo_id: str, timeout_s: float = 3.0) -> bool:
    """Can ``from_pretrained(repo_id)`` work? True when the checkpoint is in the local cache, or
    the hub answers within ``timeout_s``. Without this, an offline machine spends ~30 s in
    huggingface_hub's retries before the same error."""
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return True
    except Exception:  # noqa: BLE001 - an odd id is for from_pretrained to judge
        return True
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False"):
        return False
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _load_encoder(encoder: str, device: str = "cpu"):
    """(model, do_normalize) loaded the real way; raises AudioEncoderUnavailable."""
    try:
        import torch  # noqa: F401
        from transformers import Wav2Vec2Model
    except Exception as exc:  # pragma: no cover - core dependencies
        raise AudioEncoderUnavailable(f"transformers/torch not importable: {exc}") from exc
    if not encoder:
        raise AudioEncoderUnavailable(_unavailable_message(str(encoder), ValueError("empty encoder name")))
    expanded = os.path.expanduser(encoder)
    looks_local = os.path.isabs(expanded) or encoder.startswith((".", "~")) or os.path.exists(expanded)
    if looks_local and not os.path.isdir(expanded):
        raise AudioEncoderUnavailable(
            _unavailable_message(encoder, FileNotFoundError(f"no such directory: {expanded}"))
        )
    if looks_local:
        encoder = expanded
    elif not _hub_usable(encoder):
        raise AudioEncoderUnavailable(_unavailable_message(
            encoder, ConnectionError("not in the local Hugging Face cache and the hub is unreachable")))
    try:
        model = Wav2Vec2Model.from_pretrained(encoder)
    except Exception as exc:
        raise AudioEncoderUnavailable(_unavailable_message(encoder, exc)) from exc
    model.eval().to(device)
    do_normalize = True
    try:
        from transformers import Wav2Vec2FeatureExtractor

        fe = Wav2Vec2FeatureExtractor.from_pretrained(encoder)
        do_normalize = bool(getattr(fe, "do_normalize", True))
    except Exception:
        pass  # no preprocessor_config.json: wav2vec2 checkpoints are normalised by default
    return model, do_normalize


def check_audio_encoder(config: AudioFeatureConfig) -> Optional[dict[str, Any]]:
    """Load the encoder's config and weights once, to fail before a build starts.

    Returns the metadata a build records (``model_id``, ``num_layers``, ``dim``, ``layers``,
    ``do_normalize``), or ``None`` when audio features are disabled. Raises
    :class:`AudioEncoderUnavailable` (with a message saying what to do) or ``ValueError`` for a
    bad layer selection.
    """
    if not config.enabled:
        return None
    stage = AudioFeatureStage(config)
    stage.ensure_setup()
    meta = stage.metadata()
    stage.close()
    return meta


def wav2vec_frame_positions(num_frames: int, fps: float, num_w2v_frames: int) -> np.ndarray:
    """Fractional wav2vec frame index at the centre of each video frame, clamped to the range."""
    t = (np.arange(num_frames, dtype=np.float64) + 0.5) / float(fps)
    pos = (t * SAMPLE_RATE - W2V_FIELD / 2) / W2V_STRIDE
    return np.clip(pos, 0.0, max(num_w2v_frames - 1, 0))


def resample_frames(features: np.ndarray, num_frames: int, fps: float) -> np.ndarray:
    """Linear interpolation over time of ``features`` [F, ...] (50 Hz) to [num_frames, ...]."""
    num_src = features.shape[0]
    pos = wav2vec_frame_positions(num_frames, fps, num_src)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, num_src - 1)
    w = (pos - lo).astype(np.float32).reshape((-1,) + (1,) * (features.ndim - 1))
    return features[lo] * (1.0 - w) + features[hi] * w


class AudioFeatureStage(Stage[AudioFeatureInput, np.ndarray]):
    """wav2vec2 hidden states per video frame: ``[T, L, D]`` float16. See the module docstring."""

    name = "audio_features"

    def __init__(self, config: Optional[AudioFeatureConfig] = None):
        super().__init__()
        self.config = config or AudioFeatureConfig()
        self._model: Any = None
        self.do_normalize = True
        self.layers: list[int] = []
        self.num_layers = 0
        self.dim = 0
        self.model_id = str(self.config.encoder)

    def setup(self) -> None:
        cfg = self.config
        model, self.do_normalize = _load_encoder(cfg.encoder, cfg.device)
        total = int(model.config.num_hidden_layers) + 1
        if cfg.layers is None:
            layers = list(range(total))
        else:
            layers = []
            for i in cfg.layers:
                j = int(i) + total if int(i) < 0 else int(i)
                if not 0 <= j < total:
                    raise ValueError(
                        f"AudioFeatureConfig.layers has {i}, but {cfg.encoder!r} has {total} hidden "
                        f"states (0 = CNN projection, 1..{total - 1} = transformer layers)"
                    )
                layers.append(j)
            if not layers:
                raise ValueError("AudioFeatureConfig.layers is empty; use None for all layers")
        if np.dtype(cfg.dtype) not in (np.dtype("float16"), np.dtype("float32")):
            raise ValueError(f"AudioFeatureConfig.dtype must be float16 or float32, not {cfg.dtype!r}")
        self._model = model
        self.layers = layers
        self.num_layers = len(layers)
        self.dim = int(model.config.hidden_size)
        self.total_hidden_states = total
        name_or_path = getattr(model.config, "_name_or_path", "") or str(cfg.encoder)
        self.model_id = str(name_or_path)

    def close(self) -> None:
        self._model = None
        self._is_setup = False

    def metadata(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "num_layers": self.num_layers,
            "dim": self.dim,
            "layers": list(self.layers),
            "total_hidden_states": getattr(self, "total_hidden_states", 0),
            "do_normalize": self.do_normalize,
            "dtype": str(np.dtype(self.config.dtype)),
            "frame_alignment": "linear interpolation at video frame centres (t+0.5)/fps; "
            "wav2vec frame i centred at (320 i + 200)/16000 s",
        }

    def process(self, item: AudioFeatureInput) -> np.ndarray:
        import torch

        if item.num_frames <= 0 or item.fps <= 0:
            raise StageError("bad_audio_request", f"num_frames={item.num_frames}, fps={item.fps}")
        if int(item.sample_rate) != SAMPLE_RATE:
            raise StageError("bad_sample_rate", f"audio features need 16 kHz audio, got {item.sample_rate} Hz")
        x = np.asarray(item.samples, dtype=np.float32).reshape(-1)
        if x.size == 0:
            raise StageError("no_audio", "empty waveform")
        if not np.all(np.isfinite(x)):
            raise StageError("bad_audio", "audio holds NaN or inf samples")
        if self.do_normalize:
            x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
        if x.size < W2V_FIELD:  # at least one wav2vec frame
            x = np.pad(x, (0, W2V_FIELD - x.size))
        wav = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None].to(self.config.device)
        with torch.inference_mode():
            out = self._model(wav, output_hidden_states=True)
        hs = torch.stack([out.hidden_states[i][0] for i in self.layers], dim=1)  # [F, L, D]
        feats = hs.float().cpu().numpy()
        frames = resample_frames(feats, int(item.num_frames), float(item.fps))
        return frames.astype(np.dtype(self.config.dtype), copy=False)
