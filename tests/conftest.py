"""Shared fixtures: the real sample footage (../shared/samples beside the checkout), a tiny
wav2vec2 checkpoint built locally, and one corpus built from the samples per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
SAMPLES = Path(os.environ.get("EMO_SAMPLES_DIR", REPO.parent / "shared" / "samples")).resolve()
os.environ.setdefault("EMO_SAMPLES_DIR", str(SAMPLES))


def sample(rel: str) -> str:
    path = SAMPLES / rel
    if not path.is_file():
        pytest.skip(f"real sample footage not found at {path}: put the shared samples beside the checkout or set EMO_SAMPLES_DIR")
    return str(path)


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    if not SAMPLES.is_dir():
        pytest.skip(f"real sample footage not found at {SAMPLES}: put the shared samples beside the checkout or set EMO_SAMPLES_DIR")
    return SAMPLES


@pytest.fixture(scope="session")
def tiny_wav2vec(tmp_path_factory) -> str:
    from audio_helpers import make_tiny_wav2vec2

    return make_tiny_wav2vec2(str(tmp_path_factory.mktemp("tiny_wav2vec2")))


@pytest.fixture(scope="session")
def built_corpus(tmp_path_factory, samples_dir, tiny_wav2vec):
    """The README's main command on the sample manifest, with a tiny local wav2vec2.

    In-process executor: the Ray executor runs the same stages and is compared with it on the
    samples in test_ray_build.py."""
    from pipelines.cli import main

    out = tmp_path_factory.mktemp("corpus")
    code = main(["build", str(REPO / "manifests" / "samples.csv"), "--out", str(out), "--audio-encoder", tiny_wav2vec, "--executor", "local", "-q"])
    assert code == 0
    return out
