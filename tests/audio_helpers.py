"""Test helpers for the audio stages: real-audio decoding and tiny local checkpoints.

Nothing here downloads anything. Checkpoints are built from configs with random weights and
saved in each library's real on-disk format, so the code under test loads them the real way
(``from_pretrained(local_dir)``).

* :func:`make_tiny_wav2vec2` / :func:`make_base_wav2vec2`: transformers ``Wav2Vec2Model`` +
  ``Wav2Vec2FeatureExtractor`` saved with ``save_pretrained``.
* :func:`make_tiny_pyannote_pipeline`: a pyannote.audio ``SpeakerDiarization`` pipeline directory
  (``config.yaml`` + ``segmentation/pytorch_model.bin`` (PyanNet) + ``embedding/pytorch_model.bin``
  (WeSpeakerResNet34) + ``plda/*.npz``), in the layout of pyannote's hub pipelines, loadable with
  ``pyannote.audio.Pipeline.from_pretrained(dir)``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

# Same default as tests/conftest.py: shared/samples beside the checkout, or $EMO_SAMPLES_DIR.
SAMPLES_DIR = Path(
    os.environ.get("EMO_SAMPLES_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "samples")
)


def sample_path(rel: str) -> Path:
    """Path of a shared sample file; the test is skipped with a clear reason if it is absent."""
    import pytest

    path = Path(os.environ.get("EMO_SAMPLES_DIR", SAMPLES_DIR)) / rel
    if not path.is_file():
        pytest.skip(f"sample file {path} not present (set EMO_SAMPLES_DIR to the shared samples)")
    return path


def decode_audio_16k(path, max_seconds: Optional[float] = None) -> np.ndarray:
    """Decode the first audio stream of ``path`` with PyAV to 16 kHz mono float32 [N]."""
    import av

    chunks = []
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=16000)
        total = 0
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                arr = out.to_ndarray()[0]
                chunks.append(arr)
                total += len(arr)
            if max_seconds is not None and total >= max_seconds * 16000:
                break
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray()[0])
    samples = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if max_seconds is not None:
        samples = samples[: int(max_seconds * 16000)]
    return samples


# ------------------------------------------------------------------------------ wav2vec2

# The standard wav2vec2 feature encoder: 7 conv layers, total stride 5*2^6 = 320 samples
# (20 ms at 16 kHz -> 50 Hz), receptive field 400 samples.
_CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
_CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)


def _save_wav2vec2(config, path, seed: int = 0) -> str:
    import torch
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(seed)
    model = Wav2Vec2Model(config).eval()
    Path(path).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=False
    ).save_pretrained(str(path))
    return str(path)


def make_tiny_wav2vec2(path, seed: int = 0) -> str:
    """A ~60 k-parameter Wav2Vec2Model (hidden 32, 2 layers -> 3 hidden states) saved in ``path``.

    Returns ``str(path)``; load it with ``Wav2Vec2Model.from_pretrained(path)``.
    """
    from transformers import Wav2Vec2Config

    config = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(32,) * 7,
        conv_kernel=_CONV_KERNEL,
        conv_stride=_CONV_STRIDE,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm="group",
        do_stable_layer_norm=False,
        vocab_size=32,
    )
    return _save_wav2vec2(config, path, seed)


def make_base_wav2vec2(path, seed: int = 0) -> str:
    """wav2vec2-base-sized model (94 M parameters, 12 layers, hidden 768), random weights."""
    from transformers import Wav2Vec2Config

    config = Wav2Vec2Config()  # the defaults are facebook/wav2vec2-base's architecture
    return _save_wav2vec2(config, path, seed)


# ------------------------------------------------------------------------------ pyannote


def _save_pyannote_model(model, path: Path) -> None:
    """Save a pyannote ``Model`` the way a Lightning trainer checkpoint stores it."""
    import pytorch_lightning as pl
    import torch

    ckpt = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": pl.__version__,
    }
    model.on_save_checkpoint(ckpt)  # adds pyannote.audio versions/architecture/specifications
    path.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path / "pytorch_model.bin")


def make_tiny_pyannote_pipeline(
    path,
    seed: int = 0,
    chunk_s: float = 5.0,
    segmentation_step: float = 0.5,
    lda_dim: int = 128,
    single_speaker: bool = False,
) -> str:
    """A pyannote.audio ``SpeakerDiarization`` pipeline with random weights, saved in ``path``.

    Real classes throughout: ``PyanNet`` segmentation (powerset, 3 speakers / 2 simultaneous,
    like pyannote/segmentation-3.0), ``WeSpeakerResNet34`` embedding, a random PLDA for VBx
    clustering. ``segmentation_step`` (fraction of ``chunk_s``) is coarser than pyannote's 0.1
    to keep CPU tests fast. With ``single_speaker`` the segmentation head is biased so that every
    frame is "speaker#1 alone" (powerset class 1): the pipeline then outputs one speaker talking
    throughout, a deterministic case for the single-speaker filtering. Returns ``str(path)``.
    """
    import numpy as np
    import torch
    import yaml

    os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
    import pyannote.audio
    from pyannote.audio.core.task import Problem, Resolution, Specifications
    from pyannote.audio.models.embedding import WeSpeakerResNet34
    from pyannote.audio.models.segmentation import PyanNet

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    seg = PyanNet(sample_rate=16000, num_channels=1)
    seg.specifications = Specifications(
        problem=Problem.MONO_LABEL_CLASSIFICATION,
        resolution=Resolution.FRAME,
        duration=chunk_s,
        classes=["speaker#1", "speaker#2", "speaker#3"],
        powerset_max_classes=2,
        permutation_invariant=True,
    )
    seg.setup()  # builds the task-dependent classifier head
    if single_speaker:
        with torch.no_grad():  # powerset classes: {}, {1}, {2}, {3}, {1,2}, {1,3}, {2,3}
            seg.classifier.weight.zero_()
            seg.classifier.bias.fill_(-10.0)
            seg.classifier.bias[1] = 10.0
    _save_pyannote_model(seg, root / "segmentation")

    emb = WeSpeakerResNet34(sample_rate=16000, num_channels=1)
    emb.specifications = Specifications(
        problem=Problem.REPRESENTATION, resolution=Resolution.CHUNK, duration=chunk_s
    )
    emb.setup()
    _save_pyannote_model(emb, root / "embedding")

    rng = np.random.default_rng(seed)
    dim = int(emb.dimension)
    plda_dir = root / "plda"
    plda_dir.mkdir(exist_ok=True)
    lda = np.linalg.qr(rng.standard_normal((dim, dim)))[0][:, :lda_dim]
    np.savez(plda_dir / "xvec_transform.npz", mean1=np.zeros(dim), mean2=np.zeros(lda_dim), lda=lda)
    np.savez(plda_dir / "plda.npz", mu=np.zeros(lda_dim), tr=np.eye(lda_dim), psi=np.linspace(2.0, 0.1, lda_dim))

    config = {
        "dependencies": {"pyannote.audio": pyannote.audio.__version__},
        "pipeline": {
            "name": "pyannote.audio.pipelines.SpeakerDiarization",
            "params": {
                "segmentation": "$model/segmentation",
                "embedding": "$model/embedding",
                "plda": "$model/plda",
                "clustering": "VBxClustering",
                "segmentation_step": segmentation_step,
                "embedding_batch_size": 16,
                "segmentation_batch_size": 16,
            },
        },
        "params": {
            "segmentation": {"min_duration_off": 0.0},
            "clustering": {"threshold": 0.6, "Fa": 0.07, "Fb": 0.8},
        },
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return str(root)


def set_hf_offline(monkeypatch) -> None:
    """HF_HUB_OFFLINE=1 for this test, also where huggingface_hub already read it at import."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        import huggingface_hub.constants as hf_constants

        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True, raising=False)
    except Exception:  # pragma: no cover - huggingface_hub missing
        pass
