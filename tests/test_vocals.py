"""Vocal separation (emo_data/vocals.py) through the real classes on random weights.

The checkpoints are made the way their users get them: a tiny HTDemucs saved as demucs saves
its models (a pickled dict holding the model class, its arguments and a half-precision state),
the same converted to demucs' safetensors layout, and tiny MDX-Net-shaped models exported to
ONNX by torch. Audio is a real song from the shared samples, decoded with PyAV.
"""
from __future__ import annotations

import json
import pathlib
import warnings
from fractions import Fraction

import numpy as np
import pytest

from emo_data.stage import StageError
from emo_data.vocals import (
    HTDemucsSeparator,
    MdxOnnxSeparator,
    SegmentGrid,
    VocalsConfig,
    VocalsWeightsError,
    convert_demucs_checkpoint,
    load_htdemucs,
    main,
    make_vocal_separator,
)

from conftest import sample

torch = pytest.importorskip("torch")
pytest.importorskip("demucs")

SONG = "audio/librosa__Karissa_Hobbs_-_Lets_Go_Fishin.hq.ogg"   # female vocal over a band
SOURCES = ["drums", "bass", "other", "vocals"]


def decode(rel: str, rate: int, start_s: float, seconds: float) -> np.ndarray:
    """``seconds`` of mono float32 at ``rate`` from ``start_s``, decoded as emo_data/decode.py does."""
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    chunks, need = [], int((start_s + seconds) * rate)
    with av.open(sample(rel)) as container:
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
            if sum(len(c) for c in chunks) >= need:
                break
    audio = np.concatenate(chunks)[int(start_s * rate):need]
    assert len(audio) == need - int(start_s * rate)
    return audio.astype(np.float32)


def save_tiny_htdemucs(path: pathlib.Path, seed: int = 0, sources=SOURCES, segment=Fraction(1)) -> None:
    """A small HTDemucs with random weights, written exactly as demucs writes its checkpoints."""
    from demucs.htdemucs import HTDemucs
    from demucs.states import get_state

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HTDemucs(sources=list(sources), channels=8, dconv_comp=4, t_layers=1, t_heads=2, segment=segment)
    args, kwargs = model._init_args_kwargs
    package = {"klass": model.__class__, "args": args, "kwargs": kwargs,
               "state": get_state(model, None, half=True), "training_args": {"epochs": 1, "dset": {"name": "x"}}}
    torch.save(package, path)


class _TinyMdxNet(torch.nn.Module):
    """MDX-Net's interface ([B, 4, dim_f, dim_t] spectrogram in and out) with a tiny body: a mask
    from convolutions 3 frames wide, so each output frame depends on its neighbours only."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.outer = torch.nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, spec):
        return spec * torch.sigmoid(self.outer(torch.tanh(self.inner(spec))))


def export_tiny_mdx(path: pathlib.Path, dynamic_time: bool) -> None:
    torch.manual_seed(1)
    model = _TinyMdxNet().eval()
    dim_t = 64 if dynamic_time else 256
    axes = {"input": {0: "batch", 3: "time"}, "output": {0: "batch", 3: "time"}} if dynamic_time else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 4, 3072, dim_t),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"], dynamic_axes=axes)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models are all small ops: a second thread only adds waiting on a shared 2-core machine.
    # The separators follow torch's thread setting (the ONNX session too), as in a build worker.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocals_weights")
    files = {"th": root / "htdemucs_tiny.th", "safetensors": root / "htdemucs_tiny.safetensors",
             "onnx_dynamic": root / "mdx_tiny_dynamic.onnx", "onnx_fixed": root / "mdx_tiny_fixed.onnx"}
    save_tiny_htdemucs(files["th"])
    convert_demucs_checkpoint(str(files["th"]), str(files["safetensors"]))
    export_tiny_mdx(files["onnx_dynamic"], dynamic_time=True)
    export_tiny_mdx(files["onnx_fixed"], dynamic_time=False)
    return {k: str(v) for k, v in files.items()}


@pytest.fixture(scope="module")
def song16k():
    return decode(SONG, 16000, start_s=20.0, seconds=4.0)


# ---------------------------------------------------------------------------------------------
# HTDemucs
# ---------------------------------------------------------------------------------------------


def test_htdemucs_checkpoint_separates_real_audio_deterministically(weights, song16k):
    separator = make_vocal_separator(VocalsConfig(mode="always", weights=weights["th"]))
    assert isinstance(separator, HTDemucsSeparator)
    separator.setup()
    vocals = separator.separate(song16k, 16000)
    assert vocals.dtype == np.float32 and vocals.shape == song16k.shape
    assert np.isfinite(vocals).all() and np.abs(vocals).max() > 1e-4
    assert not np.allclose(vocals, song16k, atol=1e-3)          # the model did something
    again = separator.separate(song16k.copy(), 16000)
    assert again.tobytes() == vocals.tobytes()
    info = separator.describe()
    assert info["backend"] == "htdemucs" and info["weights"] == "htdemucs_tiny.th"
    assert info["segment_s"] == 1.0 and len(info["weights_sha256"]) == 64
    json.dumps(info)


def test_htdemucs_batching_does_not_change_the_result(weights, song16k):
    one = make_vocal_separator(VocalsConfig(mode="always", weights=weights["th"], batch_segments=1))
    four = make_vocal_separator(VocalsConfig(mode="always", weights=weights["th"], batch_segments=4))
    a, b = one.separate(song16k, 16000), four.separate(song16k, 16000)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()


def test_safetensors_conversion_is_the_same_model_and_demucs_reads_it(weights, tmp_path):
    from demucs.hf import load_safetensors_model

    from_th, from_st = load_htdemucs(weights["th"]), load_htdemucs(weights["safetensors"])
    demucs_own = load_safetensors_model(weights["safetensors"]).eval()
    assert from_st.segment == Fraction(1) and list(from_st.sources) == SOURCES
    mix = torch.randn(1, 2, 44100, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        reference = from_th(mix)
        assert torch.equal(from_st(mix), reference)
        assert torch.equal(demucs_own(mix), reference)


def test_check_command_prints_what_was_loaded(weights, capsys):
    assert main(["check", weights["safetensors"]]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == "htdemucs" and info["model_sample_rate"] == 44100


class _TouchOnLoad:
    """Unpickling this creates a file: stands in for any code a malicious checkpoint would run."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.target),))


def test_a_checkpoint_that_runs_code_on_load_is_refused(tmp_path):
    from demucs.htdemucs import HTDemucs

    good = tmp_path / "good.th"
    save_tiny_htdemucs(good)
    marker = tmp_path / "code_ran"
    with torch.serialization.safe_globals([HTDemucs, Fraction]):
        package = torch.load(good, map_location="cpu", weights_only=True)
    package["training_args"] = {"payload": _TouchOnLoad(str(marker))}
    evil = tmp_path / "evil.th"
    torch.save(package, evil)

    with pytest.raises(VocalsWeightsError, match="refusing to load"):
        make_vocal_separator(VocalsConfig(mode="always", weights=str(evil))).setup()
    assert not marker.exists()
    with pytest.raises(VocalsWeightsError, match="refusing to load"):
        convert_demucs_checkpoint(str(evil), str(tmp_path / "out.safetensors"))
    assert not marker.exists()
    # The payload is live: an ordinary unpickle (what demucs' own loader does) runs it.
    torch.load(evil, map_location="cpu", weights_only=False)
    assert marker.exists()


def test_safetensors_naming_another_class_is_refused_without_importing_it(weights, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(weights["safetensors"], framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    metadata["klass"] = "os.system"
    metadata["args"] = json.dumps(["touch should-not-exist"])
    hostile = tmp_path / "hostile.safetensors"
    save_file(tensors, str(hostile), metadata=metadata)
    with pytest.raises(VocalsWeightsError, match="os.system"):
        load_htdemucs(str(hostile))


def test_a_model_without_vocals_is_refused(tmp_path):
    path = tmp_path / "no_vocals.th"
    save_tiny_htdemucs(path, sources=["drums", "bass", "other", "piano"])
    with pytest.raises(VocalsWeightsError, match="no 'vocals'"):
        make_vocal_separator(VocalsConfig(mode="always", weights=str(path))).setup()


def test_chunk_longer_than_the_htdemucs_segment_is_an_error(weights):
    separator = make_vocal_separator(VocalsConfig(mode="always", weights=weights["th"], chunk_s=2.0))
    with pytest.raises(ValueError, match="longer than the model's segment"):
        separator.setup()


# ---------------------------------------------------------------------------------------------
# MDX-Net ONNX
# ---------------------------------------------------------------------------------------------


def test_mdx_onnx_chunked_equals_unchunked_on_real_audio_at_the_model_rate(weights):
    # At 44.1 kHz the segments' STFT frames fall on the same samples whatever the segment length,
    # so a model whose output frames depend on neighbouring frames only must give the same vocals
    # in 1 s segments as in one 10 s segment: this checks slicing, edges and cross-fades exactly.
    song = decode(SONG, 44100, start_s=20.0, seconds=4.0)
    chunked = make_vocal_separator(VocalsConfig(mode="always", weights=weights["onnx_dynamic"], chunk_s=1.0))
    whole = make_vocal_separator(VocalsConfig(mode="always", weights=weights["onnx_dynamic"], chunk_s=10.0))
    a, b = chunked.separate(song, 44100), whole.separate(song, 44100)
    assert chunked.describe()["segment_s"] < 1.0 and a.shape == b.shape == song.shape and a.dtype == np.float32
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    assert np.abs(b).max() > 0.05


def test_mdx_onnx_on_16k_audio_stays_aligned_with_the_mix(weights, song16k):
    # At 16 kHz the model's frames fall at different places in 1 s and 10 s segments, and a
    # non-linear mask is not shift-invariant: the two differ by a few percent. Both must stay
    # aligned with the mix (this model only masks it): a sample of misalignment would cost far
    # more correlation than this allows.
    chunked = make_vocal_separator(VocalsConfig(mode="always", weights=weights["onnx_dynamic"], chunk_s=1.0))
    whole = make_vocal_separator(VocalsConfig(mode="always", weights=weights["onnx_dynamic"], chunk_s=10.0))
    a, b = chunked.separate(song16k, 16000), whole.separate(song16k, 16000)
    assert a.shape == b.shape == song16k.shape
    assert np.corrcoef(a, song16k)[0, 1] > 0.99 and np.corrcoef(b, song16k)[0, 1] > 0.99
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.15


def test_mdx_onnx_fixed_shape_file_sets_the_segment(weights, song16k):
    separator = make_vocal_separator(VocalsConfig(mode="always", weights=weights["onnx_fixed"], batch_segments=2))
    assert isinstance(separator, MdxOnnxSeparator)
    separator.setup()
    assert (separator.dim_f, separator.dim_t) == (3072, 256)
    assert separator.describe()["segment_s"] == pytest.approx(1024 * 255 / 44100, abs=1e-3)
    vocals = separator.separate(song16k, 16000)          # batch of 2 through a batch-1 file
    assert vocals.shape == song16k.shape and np.corrcoef(vocals, song16k)[0, 1] > 0.99
    fixed_chunk = make_vocal_separator(VocalsConfig(mode="always", weights=weights["onnx_fixed"], chunk_s=2.0))
    with pytest.raises(ValueError, match="leave chunk_s unset"):
        fixed_chunk.setup()


def test_silence_and_empty_input(weights):
    separator = make_vocal_separator(VocalsConfig(mode="always", weights=weights["onnx_fixed"]))
    assert separator.separate(np.zeros(16000, np.float32), 16000).tobytes() == np.zeros(16000, np.float32).tobytes()
    assert separator.separate(np.zeros(0, np.float32), 16000).shape == (0,)
    with pytest.raises(ValueError, match="mono"):
        separator.separate(np.zeros((2, 100), np.float32), 16000)
    broken = np.ones(16000, np.float32)
    broken[100] = np.nan
    with pytest.raises(StageError) as error:       # a bad track is a per-source error, not a crash
        separator.separate(broken, 16000)
    assert error.value.reason == "corrupt_audio"


def test_not_an_onnx_model_is_a_weights_error(tmp_path):
    bogus = tmp_path / "Kim_Vocal_2.onnx"
    bogus.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(VocalsWeightsError, match="not a loadable ONNX model"):
        make_vocal_separator(VocalsConfig(mode="always", weights=str(bogus))).setup()


# ---------------------------------------------------------------------------------------------
# The segment grid and the configuration
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [16000, 44100])
@pytest.mark.parametrize("length", [1, 999, 44100, 300_001])
def test_segment_weights_sum_to_one_everywhere(rate, length):
    grid = SegmentGrid.plan(length, rate, 44100, 44100, 7680, 0.25, 1024)
    total = np.zeros(length, np.float32)
    for k in range(grid.count):
        grid.add(total, k, np.ones(grid.segment, np.float32))
    assert np.abs(total - 1.0).max() < 1e-6
    assert grid.segment == 44100 * rate // 44100          # one segment's memory, whatever the length


def test_auto_mode_decides_per_kind():
    configured = VocalsConfig(weights="/models/Kim_Vocal_2.onnx")
    assert configured.decide("singing").separate and configured.decide("Film").reason == "kind_separated"
    talk = configured.decide("talk")
    assert not talk.separate and talk.reason == "kind_not_separated"
    unconfigured = VocalsConfig()
    decision = unconfigured.decide("singing")
    assert not decision.separate and decision.reason == "no_weights_configured" and "--vocals-weights" in decision.detail
    assert make_vocal_separator(unconfigured) is None                      # the build goes on with the mix
    assert make_vocal_separator(VocalsConfig(mode="never", weights="/nowhere.onnx")) is None
    assert VocalsConfig(mode="never", weights="/x.onnx").decide("singing").reason == "mode_never"
    assert VocalsConfig(mode="always", weights="/x.onnx").decide("talk").separate
    assert VocalsConfig(auto_kinds=["Concert"], weights="/x.th").decide("concert").separate
    json.dumps(decision.to_dict())
    json.dumps(configured.to_dict())


def test_always_without_weights_says_where_to_get_them(tmp_path):
    with pytest.raises(VocalsWeightsError) as error:
        make_vocal_separator(VocalsConfig(mode="always"))
    text = str(error.value)
    assert "dl.fbaipublicfiles.com/demucs" in text and "Kim_Vocal_2.onnx" in text and "--vocals-weights" in text
    with pytest.raises(VocalsWeightsError, match="no such file"):
        make_vocal_separator(VocalsConfig(mode="auto", weights=str(tmp_path / "missing.th")))


@pytest.mark.parametrize("bad", [dict(mode="sometimes"), dict(backend="spleeter"), dict(weights="model.bin"),
                                 dict(overlap=0.9), dict(chunk_s=0), dict(batch_segments=0), dict(device="tpu")])
def test_config_validates_itself(bad):
    with pytest.raises(ValueError):
        VocalsConfig(**bad)
