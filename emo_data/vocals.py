"""Vocal separation: the voice of a clip without the music and effects under it.

Singing and film footage carry a score, effects and crowd noise under the voice. They confuse
speech activity, lip-sync scoring and wav2vec features, so for those kinds the build runs the
gates and features on the separated vocals, while the shard's ``wav`` stays the original mix.

One interface, :class:`VocalSeparator` (``setup()`` once per worker, ``separate(samples, rate)``
per track), two real backends that load weights from a local path:

- ``htdemucs``: demucs' Hybrid Transformer Demucs (``pip install demucs``; the ``vocals`` extra).
  Accepts demucs' own ``.th`` checkpoints (read with ``torch.load(weights_only=True)``, allowing
  only the ``HTDemucs`` class and ``fractions.Fraction`` out of the pickle, so nothing in the file
  can run code) and demucs' safetensors layout (class and arguments as JSON metadata; the class
  name must be exactly ``demucs.htdemucs.HTDemucs``). ``python -m emo_data.vocals convert-demucs
  IN.th OUT.safetensors`` converts the first into the second.
- ``mdx_onnx``: an MDX-Net vocal model in ONNX (UVR's ``Kim_Vocal_2.onnx``,
  ``UVR-MDX-NET-Voc_FT.onnx``), run by onnxruntime. An ONNX file is a graph of standard
  operators: data, not code.

Both models work at 44.1 kHz stereo; the 16 kHz mono track is resampled per segment and the
vocals come back at the caller's rate, same length, float32 mono.

Long tracks are processed as fixed model segments (HTDemucs: the model's training segment, 7.8 s
for the released models; MDX-Net: ``hop * (dim_t - 1)`` samples, 5.9 s for Kim_Vocal_2) on a grid
that depends only on the track length and the model, overlapping by ``overlap`` (25 %) with
linear cross-fades whose weights sum to one. Memory is one batch of segments (``batch_segments``)
plus the output array, whatever the track length; the result does not depend on the batch size.
``chunk_s`` sets a shorter segment when memory is tighter still.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional

import numpy as np

from .config import VOCALS_BACKENDS, VOCALS_MODES, VocalsConfig, VocalsDecision  # noqa: F401 - re-exported
from .config import vocals_backend_for as _backend_for_path
from .stage import StageError

DEMUCS_CLASS_NAME = "demucs.htdemucs.HTDemucs"

WEIGHTS_HELP = (
    "Vocal separation needs separator weights on local disk (nothing is downloaded at build time). "
    "Get one of:\n"
    "  - HTDemucs (demucs, MIT licence): "
    "https://dl.fbaipublicfiles.com/demucs/hybrid_transformer/955717e8-8726e21a.th "
    "(htdemucs, 4 stems), or the vocals model of htdemucs_ft, "
    "https://dl.fbaipublicfiles.com/demucs/hybrid_transformer/04573f0d-f3cf25b2.th "
    "(better vocals, same cost); backend 'htdemucs';\n"
    "  - an MDX-Net vocal model in ONNX from Ultimate Vocal Remover, e.g. "
    "https://github.com/TRvlvr/model_repo/releases/download/all_public_uvr_models/Kim_Vocal_2.onnx; "
    "backend 'mdx_onnx'.\n"
    "Then point the build at the file: VocalsConfig(weights='/path/to/file') "
    "(the build's --vocals-weights /path/to/file)."
)


class VocalsWeightsError(ValueError):
    """The separator weights are missing, unreadable, unsafe or not a vocal model.

    A configuration problem that concerns every clip, so it stops the build instead of becoming
    a per-clip manifest row."""


# --------------------------------------------------------------------------------------------
# Configuration and the per-source decision
# --------------------------------------------------------------------------------------------


def make_vocal_separator(config: VocalsConfig) -> Optional["VocalSeparator"]:
    """The separator a build needs under ``config``, or None when no source can be separated.

    Call ``setup()`` on the result once per worker. ``always`` without weights is an error that
    says where to get them; ``auto`` without weights returns None (see ``VocalsConfig.decide``).
    """
    if config.mode == "never":
        return None
    if config.weights is None:
        if config.mode == "always":
            raise VocalsWeightsError("--vocals always needs separator weights, and none are configured.\n" + WEIGHTS_HELP)
        return None
    path = os.path.expanduser(config.weights)
    if not os.path.isfile(path):
        raise VocalsWeightsError(f"separator weights {path!r}: no such file.\n" + WEIGHTS_HELP)
    backend = config.backend if config.backend != "auto" else _backend_for_path(path)
    common = dict(device=config.device, chunk_s=config.chunk_s, overlap=config.overlap,
                  batch_segments=int(config.batch_segments))
    if backend == "htdemucs":
        return HTDemucsSeparator(path, **common)
    return MdxOnnxSeparator(path, n_fft=config.mdx_n_fft, hop=config.mdx_hop, dim_t=config.mdx_dim_t, **common)


# --------------------------------------------------------------------------------------------
# The interface and the segment grid shared by both backends
# --------------------------------------------------------------------------------------------


class VocalSeparator(ABC):
    """Mono float32 track in, its vocals out: same length, same rate, float32 mono.

    Subclasses load their model in ``_load`` and separate one batch of model-rate stereo segments
    in ``_separate_segments``; this class owns resampling, normalisation and the segment grid.
    """

    name = "vocals"
    model_sample_rate = 44100
    model_channels = 2

    def __init__(self, weights: str, device: str = "cpu", chunk_s: Optional[float] = None,
                 overlap: float = 0.25, batch_segments: int = 1):
        self.weights = weights
        self.device = device
        self.chunk_s = chunk_s
        self.overlap = float(overlap)
        self.batch_segments = int(batch_segments)
        self._ready = False
        self._weights_sha256: Optional[str] = None
        self.segment_samples = 0        # model-rate samples per model call, set by _load
        self.edge_samples = 0           # model-rate samples at each segment end whose output is not used
        self.align_samples = 1          # the model's STFT hop: segment starts fall on multiples of it when possible

    # -- lifecycle -----------------------------------------------------------------------------
    def setup(self) -> None:
        """Load the model (once per worker; later calls do nothing)."""
        if self._ready:
            return
        self._weights_sha256 = _sha256(self.weights)
        self._load()
        if self.segment_samples <= 2 * self.edge_samples:
            raise VocalsWeightsError(f"{self.weights}: segment of {self.segment_samples} samples is too short")
        self._ready = True

    def describe(self) -> dict[str, Any]:
        """What separated the vocals, for each clip's json."""
        return {"backend": self.name, "weights": os.path.basename(self.weights),
                "weights_sha256": self._weights_sha256, "model_sample_rate": self.model_sample_rate,
                "segment_s": round(self.segment_samples / self.model_sample_rate, 4) if self.segment_samples else None,
                "overlap": self.overlap}

    # -- the work ------------------------------------------------------------------------------
    def separate(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        if not self._ready:
            self.setup()
        x = np.asarray(samples, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"separate() takes mono samples [N], got shape {x.shape}")
        n = len(x)
        if n == 0:
            return np.zeros(0, np.float32)
        if int(sample_rate) != sample_rate or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive integer, not {sample_rate!r}")
        peak, mean, std = _track_stats(x)
        if not np.isfinite(peak):
            raise StageError("corrupt_audio", "vocal separation: the audio holds NaN or infinite samples")
        if peak == 0.0:              # digital silence: nothing to separate
            return np.zeros(n, np.float32)
        offset, scale = self._normalisation(peak, mean, std)
        grid = SegmentGrid.plan(n, sample_rate, self.model_sample_rate, self.segment_samples,
                                self.edge_samples, self.overlap, self.align_samples)
        out = np.zeros(n, np.float32)
        batch: list[int] = []
        for k in range(grid.count):
            batch.append(k)
            if len(batch) == self.batch_segments or k == grid.count - 1:
                self._run_batch(x, int(sample_rate), grid, batch, out, (offset, scale))
                batch = []
        # Back to the input's level, in place: the track and the output are the only arrays as
        # long as the input (a 1-hour track at 16 kHz: 230 MB each).
        out /= scale
        out += offset
        return out

    def _run_batch(self, x: np.ndarray, rate: int, grid: "SegmentGrid", ks: list[int], out: np.ndarray,
                   level: tuple[float, float]) -> None:
        segments = np.stack([_resample(grid.slice(x, k, level), rate, self.model_sample_rate, self.segment_samples)
                             for k in ks])                                   # [B, S_model]
        stereo = np.repeat(segments[:, None, :], self.model_channels, axis=1)  # [B, C, S_model]
        vocals = self._separate_segments(np.ascontiguousarray(stereo, dtype=np.float32))  # [B, C, S_model]
        for row, k in enumerate(ks):
            mono = vocals[row].mean(axis=0)
            back = _resample(mono, self.model_sample_rate, rate, grid.segment)
            grid.add(out, k, back)

    # -- backend hooks -------------------------------------------------------------------------
    @abstractmethod
    def _load(self) -> None:
        """Load the model from ``self.weights`` (each backend reads its own format)."""

    @abstractmethod
    def _separate_segments(self, stereo: np.ndarray) -> np.ndarray:
        """[B, 2, n] model-rate stereo segments -> [B, n] vocals."""

    def _normalisation(self, peak: float, mean: float, std: float) -> tuple[float, float]:
        """``(offset, scale)``: the model sees ``(x - offset) * scale``. From the whole track's
        statistics (never zero peak), so the result does not depend on the segment grid."""
        return 0.0, 1.0


@dataclass(frozen=True)
class SegmentGrid:
    """Overlapping segments over a track, at the track's rate.

    Segment ``k`` reads ``segment`` samples from ``k*hop - edge`` (zeros outside the track). Its
    weight is 0 over the first ``edge`` samples (model edge effects, resampling transients), rises
    linearly over ``fade`` samples, is 1 for ``hop - fade``, falls over ``fade`` samples while the
    next segment rises, and is 0 after that: neighbours' weights sum to exactly one, so no
    normalisation buffer is needed. The first segment does not fade in, the last does not fade out.

    When the model's STFT hop is a whole number of track samples (a track already at the model's
    rate), ``edge``, ``fade`` and ``hop`` are multiples of it, so every segment puts its STFT frames
    at the same places on the track whatever the segment length: the result then depends on the
    segment length only through the model's context, not through where its frames fall.
    """

    length: int
    segment: int
    edge: int
    fade: int
    hop: int
    count: int

    @staticmethod
    def plan(length: int, rate: int, model_rate: int, model_segment: int, model_edge: int,
             overlap: float, model_align: int = 1) -> "SegmentGrid":
        segment = int(model_segment * rate // model_rate)
        # 2 ms covers the polyphase resampler's transients at both conversions.
        guard = int(math.ceil(0.002 * rate)) + 1 if rate != model_rate else 0
        edge = int(math.ceil(model_edge * rate / model_rate)) + guard
        align_exact = model_align * rate / model_rate
        align = int(align_exact) if align_exact == int(align_exact) and align_exact >= 1 else 1
        edge = -(-edge // align) * align
        usable = segment - 2 * edge
        fade = int(round(overlap * usable / align)) * align
        hop = (usable - fade) // align * align
        if hop < 1:
            raise ValueError(f"a segment of {segment} samples at {rate} Hz leaves no hop after edges of "
                             f"{edge} and a fade of {fade}; use a longer chunk_s or a smaller overlap")
        count = max(1, int(math.ceil((length - hop - fade) / hop)) + 1)
        return SegmentGrid(length, segment, edge, fade, hop, count)

    def start(self, k: int) -> int:
        return k * self.hop - self.edge

    def slice(self, x: np.ndarray, k: int, level: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
        """Segment ``k`` of ``x`` as ``(x - offset) * scale``, zeros outside the track."""
        offset, scale = level
        lo = self.start(k)
        piece = np.zeros(self.segment, np.float32)
        a, b = max(lo, 0), min(lo + self.segment, len(x))
        if b > a:
            piece[a - lo:b - lo] = (x[a:b] - np.float32(offset)) * np.float32(scale)
        return piece

    def weights(self, k: int) -> np.ndarray:
        w = np.zeros(self.segment, np.float32)
        e, f, h = self.edge, self.fade, self.hop
        ramp = (np.arange(f, dtype=np.float64) + 0.5) / max(f, 1)
        w[e:e + f] = 1.0 if k == 0 else ramp
        w[e + f:e + h] = 1.0
        w[e + h:e + h + f] = 1.0 if k == self.count - 1 else (1.0 - ramp)
        return w

    def add(self, out: np.ndarray, k: int, y: np.ndarray) -> None:
        lo = self.start(k)
        w = self.weights(k)
        a, b = max(lo, 0), min(lo + self.segment, len(out))
        out[a:b] += (w * y)[a - lo:b - lo]


def _resample(x: np.ndarray, rate_in: int, rate_out: int, length: int) -> np.ndarray:
    """Polyphase resampling (zero-phase, so sample 0 stays at time 0), cut or padded to ``length``."""
    if rate_in != rate_out:
        from scipy.signal import resample_poly

        g = math.gcd(int(rate_in), int(rate_out))
        x = resample_poly(x, rate_out // g, rate_in // g).astype(np.float32, copy=False)
    if len(x) >= length:
        return x[:length]
    return np.pad(x, (0, length - len(x)))


def _track_stats(x: np.ndarray, block: int = 1 << 20) -> tuple[float, float, float]:
    """Peak, mean and standard deviation of a track, a block at a time (no track-sized temporaries)."""
    peak, total, total_sq = 0.0, 0.0, 0.0
    for i in range(0, len(x), block):
        part = x[i:i + block].astype(np.float64)
        part_peak = float(np.abs(part).max())
        if not np.isfinite(part_peak):
            return float("nan"), float("nan"), float("nan")
        peak = max(peak, part_peak)
        total += float(part.sum())
        total_sq += float(np.dot(part, part))
    n = max(len(x), 1)
    mean = total / n
    return peak, mean, float(np.sqrt(max(total_sq / n - mean * mean, 0.0)))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# HTDemucs
# --------------------------------------------------------------------------------------------


class HTDemucsSeparator(VocalSeparator):
    """demucs' Hybrid Transformer Demucs; uses its ``vocals`` source."""

    name = "htdemucs"

    def _load(self) -> None:
        import torch

        model = load_htdemucs(self.weights)
        if "vocals" not in model.sources:
            raise VocalsWeightsError(f"{self.weights}: the model separates {list(model.sources)}, no 'vocals'")
        self._vocals_index = list(model.sources).index("vocals")
        self.model_sample_rate = int(model.samplerate)
        self.model_channels = int(model.audio_channels)
        training = int(Fraction(model.segment) * model.samplerate)
        if self.chunk_s is None:
            self.segment_samples = training
        else:
            self.segment_samples = int(round(self.chunk_s * model.samplerate))
            if self.segment_samples > training:
                raise ValueError(f"chunk_s={self.chunk_s} is longer than the model's segment of "
                                 f"{training / model.samplerate:.2f} s, which HTDemucs cannot exceed")
        # One STFT hop (nfft/4) at each end: frames there see half a window.
        self.edge_samples = int(model.nfft) // 4
        self.align_samples = int(model.nfft) // 4
        self._device = torch.device(self.device)
        self._model = model.to(self._device).eval()

    def _normalisation(self, peak: float, mean: float, std: float) -> tuple[float, float]:
        # As demucs' own separate/api: the mix is standardised by its mean and std over the
        # whole track; the model is trained on such input. (A constant non-zero track: offset only.)
        return mean, (1.0 / std if std > 0.0 else 1.0)

    def _separate_segments(self, stereo: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            sources = self._model(torch.from_numpy(stereo).to(self._device))   # [B, sources, C, S]
        return sources[:, self._vocals_index].float().cpu().numpy()


def _demucs_classes():
    try:
        from demucs.htdemucs import HTDemucs
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise VocalsWeightsError("the htdemucs backend needs the demucs package: pip install 'emo[vocals]' "
                                 "(or pip install demucs)") from exc
    return HTDemucs


def load_htdemucs(path: str):
    """An HTDemucs model from a demucs ``.th`` checkpoint or demucs' safetensors layout.

    Never executes code from the file: the pickle is read with ``weights_only=True`` and only
    ``HTDemucs`` and ``Fraction`` may appear in it; the safetensors class name is compared as
    text, never imported. Anything else is refused with :class:`VocalsWeightsError`.
    """
    HTDemucs = _demucs_classes()
    if path.lower().endswith(".safetensors"):
        klass_name, args, kwargs, state = _read_demucs_safetensors(path)
    else:
        klass_name, args, kwargs, state = _read_demucs_pickle(path)
    if klass_name != DEMUCS_CLASS_NAME:
        raise VocalsWeightsError(f"{path}: holds a {klass_name} model; only {DEMUCS_CLASS_NAME} (htdemucs, "
                                 "htdemucs_ft, htdemucs_6s) is supported")
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
        raise VocalsWeightsError(f"{path}: model arguments are not a list and a dict")
    if state.get("__quantized"):
        raise VocalsWeightsError(f"{path}: a diffq-quantized checkpoint; use an unquantized HTDemucs model")
    import inspect
    import warnings

    accepted = inspect.signature(HTDemucs).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}   # as demucs does for older checkpoints
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # "zero-element tensors" from small configurations
            model = HTDemucs(*args, **kwargs)
        model.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - a wrong file surfaces here as any of several errors
        raise VocalsWeightsError(f"{path}: not a loadable HTDemucs checkpoint ({type(exc).__name__}: {exc})") from exc
    return model.float().eval()


def _read_demucs_pickle(path: str):
    import pickle

    import torch

    HTDemucs = _demucs_classes()
    try:
        with torch.serialization.safe_globals([HTDemucs, Fraction]):
            package = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise VocalsWeightsError(
            f"refusing to load {path}: it is not a plain demucs checkpoint; the file asks for objects other "
            f"than the HTDemucs class and tensors, which could run code when loaded ({exc}). "
            "Use the files demucs publishes, or convert a trusted checkpoint with "
            "`python -m emo_data.vocals convert-demucs IN.th OUT.safetensors`.") from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise VocalsWeightsError(f"{path}: not a readable torch checkpoint ({exc})") from exc
    if not isinstance(package, dict) or not {"klass", "args", "kwargs", "state"} <= set(package):
        raise VocalsWeightsError(f"{path}: not a demucs model package (expected klass/args/kwargs/state; "
                                 "a bare state_dict does not say how to build the model)")
    klass = package["klass"]
    klass_name = f"{klass.__module__}.{klass.__qualname__}" if isinstance(klass, type) else repr(klass)
    return klass_name, package["args"], package["kwargs"], dict(package["state"])


def _read_demucs_safetensors(path: str):
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise VocalsWeightsError(f"{path}: not a readable safetensors file ({exc})") from exc
    if "structure" in metadata:
        raise VocalsWeightsError(f"{path}: a packed (quantized) demucs state; use an unquantized HTDemucs model")
    missing = {"klass", "args", "kwargs"} - set(metadata)
    if missing:
        raise VocalsWeightsError(f"{path}: safetensors metadata lacks {sorted(missing)}; expected demucs' layout "
                                 "(see `python -m emo_data.vocals convert-demucs`)")
    try:
        args = _json_decode(json.loads(metadata["args"]))
        kwargs = _json_decode(json.loads(metadata["kwargs"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise VocalsWeightsError(f"{path}: model arguments in the metadata are not valid JSON ({exc})") from exc
    return metadata["klass"], args, kwargs, state


def _json_encode(value):
    """Model arguments as JSON; fractions (HTDemucs' ``segment``) as demucs' hub files write them."""
    if isinstance(value, Fraction):
        return {"_type": "fraction", "numerator": value.numerator, "denominator": value.denominator}
    if isinstance(value, dict):
        return {str(k): _json_encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_encode(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store model argument of type {type(value).__name__} as JSON")


def _json_decode(value):
    if isinstance(value, dict):
        if value.get("_type") == "fraction":
            return Fraction(int(value["numerator"]), int(value["denominator"]))
        return {k: _json_decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_decode(v) for v in value]
    return value


def convert_demucs_checkpoint(src: str, dst: str) -> None:
    """Write a demucs ``.th`` checkpoint as safetensors with the class and arguments as JSON
    metadata (demucs' hub layout, readable by demucs' ``load_safetensors_model`` too). The
    source is read with the same allow-list as :func:`load_htdemucs`."""
    import torch
    from safetensors.torch import save_file

    klass_name, args, kwargs, state = _read_demucs_pickle(src)
    if klass_name != DEMUCS_CLASS_NAME:
        raise VocalsWeightsError(f"{src}: holds a {klass_name} model; only {DEMUCS_CLASS_NAME} is converted")
    tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    metadata = {"klass": klass_name, "args": json.dumps(_json_encode(list(args))),
                "kwargs": json.dumps(_json_encode(kwargs), sort_keys=True)}
    save_file(tensors, dst, metadata=metadata)


# --------------------------------------------------------------------------------------------
# MDX-Net (ONNX)
# --------------------------------------------------------------------------------------------


class MdxOnnxSeparator(VocalSeparator):
    """An MDX-Net vocal model (spectrogram in, vocal spectrogram out) run by onnxruntime.

    The model sees ``[batch, 4, dim_f, dim_t]``: real and imaginary parts of both channels'
    STFT (Hann window ``n_fft``, hop ``hop``, centred), the lowest ``dim_f`` bins, the first three
    zeroed, as UVR runs these models. ``dim_f`` and ``dim_t`` come from the file's input shape.
    """

    name = "mdx_onnx"

    def __init__(self, weights: str, n_fft: int = 7680, hop: int = 1024, dim_t: Optional[int] = None, **kwargs):
        super().__init__(weights, **kwargs)
        self.n_fft = int(n_fft)
        self.hop = int(hop)
        self.requested_dim_t = dim_t

    def _load(self) -> None:
        import onnxruntime as ort
        import torch

        options = ort.SessionOptions()
        # Follow the worker's torch thread budget, which the executor sets for every model.
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.use_deterministic_compute = True
        options.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if self.device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise VocalsWeightsError(f"device {self.device!r}: this onnxruntime has no CUDA provider "
                                         "(install onnxruntime-gpu) ")
            device_id = int(self.device.split(":")[1]) if ":" in self.device else 0
            providers = [("CUDAExecutionProvider", {"device_id": device_id})]
        try:
            session = ort.InferenceSession(self.weights, sess_options=options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise VocalsWeightsError(f"{self.weights}: not a loadable ONNX model ({exc})") from exc
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1 or len(inputs[0].shape) != 4:
            raise VocalsWeightsError(f"{self.weights}: expected one input [batch, 4, dim_f, dim_t] "
                                     f"(an MDX-Net model), found {[(i.name, i.shape) for i in inputs]}")
        batch, channels, dim_f, dim_t = inputs[0].shape
        if channels != 4:
            raise VocalsWeightsError(f"{self.weights}: input has {channels} channels; MDX-Net stereo models take 4")
        if not isinstance(dim_f, int):
            raise VocalsWeightsError(f"{self.weights}: the frequency axis is not fixed in the file")
        if dim_f > self.n_fft // 2 + 1:
            raise VocalsWeightsError(f"{self.weights}: dim_f {dim_f} exceeds n_fft/2+1 = {self.n_fft // 2 + 1}; "
                                     "set VocalsConfig.mdx_n_fft to the model's n_fft")
        if isinstance(dim_t, int):
            if self.requested_dim_t not in (None, dim_t):
                raise ValueError(f"{self.weights}: the file fixes dim_t = {dim_t}, not {self.requested_dim_t}")
            wanted = dim_t if self.chunk_s is None else int(self.chunk_s * self.model_sample_rate) // self.hop + 1
            if wanted != dim_t:
                raise ValueError(f"chunk_s={self.chunk_s}: this model's segment is fixed at "
                                 f"{self.hop * (dim_t - 1) / self.model_sample_rate:.2f} s; leave chunk_s unset")
        else:   # a dynamic time axis: the caller may choose the segment
            if self.chunk_s is not None:
                dim_t = int(self.chunk_s * self.model_sample_rate) // self.hop + 1
            else:
                dim_t = self.requested_dim_t or 256
        self._session = session
        self._input_name = inputs[0].name
        self._fixed_batch = batch if isinstance(batch, int) else None
        self.dim_f, self.dim_t = int(dim_f), int(dim_t)
        self.segment_samples = self.hop * (self.dim_t - 1)
        # A sample is clean when every frame overlapping it lies inside the segment: n_fft from
        # each end (UVR trims n_fft/2 and then fades the rest in with a Hann window).
        self.edge_samples = self.n_fft
        self.align_samples = self.hop
        self._window = torch.hann_window(self.n_fft, periodic=True)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update({"n_fft": self.n_fft, "hop": self.hop, "dim_f": getattr(self, "dim_f", None),
                     "dim_t": getattr(self, "dim_t", None)})
        return info

    def _normalisation(self, peak: float, mean: float, std: float) -> tuple[float, float]:
        # UVR lowers the mix to a 0.9 peak before these models (never raises it).
        return 0.0, min(1.0, 0.9 / peak)

    def _separate_segments(self, stereo: np.ndarray) -> np.ndarray:
        import torch

        b, c, n = stereo.shape
        wave = torch.from_numpy(stereo).reshape(b * c, n)
        spec = torch.stft(wave, self.n_fft, self.hop, window=self._window, center=True, return_complex=True)
        spec = torch.view_as_real(spec).permute(0, 3, 1, 2)                      # [B*C, 2, F, T]
        spec = spec.reshape(b, c * 2, spec.shape[-2], spec.shape[-1])[:, :, :self.dim_f]
        spec[:, :, :3] = 0.0
        spec_np = np.ascontiguousarray(spec.numpy(), dtype=np.float32)
        step = self._fixed_batch or len(spec_np)
        pred = np.concatenate([self._session.run(None, {self._input_name: spec_np[i:i + step]})[0]
                               for i in range(0, len(spec_np), step)])
        pred_t = torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float32))
        bins = self.n_fft // 2 + 1
        pred_t = torch.cat([pred_t, torch.zeros(b, 4, bins - self.dim_f, pred_t.shape[-1])], dim=2)
        pred_t = pred_t.reshape(b * c, 2, bins, -1).permute(0, 2, 3, 1).contiguous()
        wave_out = torch.istft(torch.view_as_complex(pred_t), self.n_fft, self.hop, window=self._window,
                               center=True, length=n)
        return wave_out.reshape(b, c, n).numpy()


# --------------------------------------------------------------------------------------------
# Command line: check a weights file, convert a demucs checkpoint
# --------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m emo_data.vocals", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="load a separator weights file and print what it is")
    check.add_argument("weights")
    check.add_argument("--backend", default="auto", choices=VOCALS_BACKENDS)
    convert = sub.add_parser("convert-demucs", help="demucs .th checkpoint -> safetensors + JSON metadata")
    convert.add_argument("src")
    convert.add_argument("dst")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            separator = make_vocal_separator(VocalsConfig(mode="always", weights=args.weights, backend=args.backend))
            assert separator is not None
            separator.setup()
            print(json.dumps(separator.describe(), indent=2))
        else:
            convert_demucs_checkpoint(args.src, args.dst)
            print(f"wrote {args.dst}")
    except VocalsWeightsError as exc:
        parser.exit(2, f"error: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
