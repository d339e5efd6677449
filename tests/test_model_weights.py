"""Loading SD1.5 (diffusers layout) and AnimateDiff motion modules (original .ckpt/.safetensors and
diffusers MotionAdapter layouts) into the EMO network, with tiny random checkpoints written in
the real formats and loaded back the real way (HF_HUB_OFFLINE=1)."""
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import MotionAdapter, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers
from safetensors.torch import save_file

from emo_model import EMOModel
from emo_model.tiny import TINY_UNET, tiny_emo_config
from emo_model.unet import Conditions, sinusoidal_table

torch.set_num_threads(1)  # tiny ops: a second thread only adds sync cost on a busy 2-core box


def _perturb(module, scale=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A tiny SD1.x pipeline directory: unet/ (safetensors) + text_encoder/ + tokenizer/."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("sd15")
    torch.manual_seed(0)
    unet = _perturb(UNet2DConditionModel(**TINY_UNET))
    unet.save_pretrained(root / "unet", safe_serialization=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "a": 4, "b": 5}
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=7)
    tok.save_pretrained(root / "tokenizer")
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=6, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=7, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    enc.save_pretrained(root / "text_encoder", safe_serialization=True)
    return root


@pytest.fixture(scope="module")
def adapter():
    """A tiny diffusers MotionAdapter matching the tiny UNet, with non-zero (trained-like) weights."""
    torch.manual_seed(3)
    ad = MotionAdapter(block_out_channels=TINY_UNET["block_out_channels"], motion_layers_per_block=1,
                       motion_num_attention_heads=8, motion_norm_num_groups=TINY_UNET["norm_num_groups"],
                       motion_max_seq_length=32, use_motion_mid_block=True)
    return _perturb(ad, 0.05, seed=4)


def _original_keys(diffusers_state: dict, channels_of) -> dict:
    """diffusers MotionAdapter keys -> original AnimateDiff (mm_sd_v15_v2) keys, with the
    ``pos_encoder.pe`` buffers the original checkpoints carry. Written out literally here (not via
    emo_model) and cross-checked against diffusers' own converter below."""
    out = {}
    for k, v in diffusers_state.items():
        head, _, tail = k.partition(".motion_modules.")
        idx, _, rest = tail.partition(".")
        rest = (rest.replace("attn1.", "attention_blocks.0.").replace("attn2.", "attention_blocks.1.")
                .replace("norm1.", "norms.0.").replace("norm2.", "norms.1.").replace("norm3.", "ff_norm."))
        out[f"{head}.motion_modules.{idx}.temporal_transformer.{rest}"] = v
    for k in list(out):
        if k.endswith("attention_blocks.0.to_q.weight") or k.endswith("attention_blocks.1.to_q.weight"):
            c = out[k].shape[1]
            out[k.replace("to_q.weight", "pos_encoder.pe")] = sinusoidal_table(32, c)
    return out


@pytest.fixture(scope="module")
def mm_files(tmp_path_factory, adapter):
    root = tmp_path_factory.mktemp("mm")
    state = {k: v.clone() for k, v in adapter.state_dict().items() if "pos_embed" not in k}
    original = _original_keys(state, None)
    # the file really is in AnimateDiff's format: diffusers' converter maps it back exactly
    back = convert_animatediff_checkpoint_to_diffusers(original)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight" in original
    assert "mid_block.motion_modules.0.temporal_transformer.norm.bias" in original
    assert "up_blocks.3.motion_modules.1.temporal_transformer.transformer_blocks.0.ff.net.0.proj.weight" in original
    save_file({k: v.contiguous() for k, v in original.items()}, str(root / "mm_tiny.safetensors"))
    torch.save(original, str(root / "mm_tiny.ckpt"))  # AnimateDiff ships a plain torch state dict
    adapter.save_pretrained(root / "adapter", safe_serialization=True)
    return {"safetensors": root / "mm_tiny.safetensors", "ckpt": root / "mm_tiny.ckpt", "dir": root / "adapter",
            "original": original}


# ----------------------------------------------------------------------------- SD1.5
def test_from_sd15_reproduces_sd_unet(sd_dir):
    from transformers import CLIPTextModel, CLIPTokenizer

    model = EMOModel.from_sd15(str(sd_dir), **{k: v for k, v in tiny_emo_config().items() if k not in TINY_UNET and k != "text_context_tokens"}).eval()
    unet = UNet2DConditionModel.from_pretrained(sd_dir / "unet").eval()
    tok = CLIPTokenizer.from_pretrained(sd_dir / "tokenizer")
    enc = CLIPTextModel.from_pretrained(sd_dir / "text_encoder").eval()
    with torch.no_grad():
        empty = enc(tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids)[0]
    torch.testing.assert_close(model.text_context, empty, rtol=0, atol=0)  # SD's unconditional context
    # every SD weight landed in both UNets
    sd = unet.state_dict()
    for name, net in (("backbone", model.backbone), ("reference_net", model.reference_net)):
        own = net.state_dict()
        for k, v in sd.items():
            if k in own:
                assert torch.equal(own[k], v), (name, k)
    assert all(k in model.backbone.state_dict() for k in sd)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 1, 8, 8, generator=g)
    with torch.no_grad():
        ours = model(x, 250, face_mask=torch.ones(2, 1, 64, 64)).sample[:, :, 0]
        theirs = unet(x[:, :, 0], 250, encoder_hidden_states=empty.expand(2, -1, -1)).sample
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)  # float32 rounding


def test_from_sd15_without_text_encoder_and_errors(tmp_path, sd_dir):
    import shutil

    shutil.copytree(sd_dir / "unet", tmp_path / "unet")
    m = EMOModel.from_sd15(str(tmp_path / "unet"), **{k: v for k, v in tiny_emo_config().items() if k not in TINY_UNET})
    assert torch.count_nonzero(m.text_context) == 0  # no text encoder: zeros (logged)
    bad = dict(TINY_UNET, block_out_channels=(32, 32, 64, 96))
    UNet2DConditionModel(**bad).save_pretrained(tmp_path / "bad" / "unet")
    m2 = EMOModel(**tiny_emo_config())
    with pytest.raises(ValueError, match="shape mismatch"):
        from emo_model.weights import load_sd_unet_state_dict

        m2.load_sd_unet(load_sd_unet_state_dict(str(tmp_path / "bad" / "unet")))


# ----------------------------------------------------------------------------- AnimateDiff
@pytest.mark.parametrize("kind", ["safetensors", "ckpt", "dir"])
def test_load_motion_module_formats(kind, mm_files):
    model = EMOModel(**tiny_emo_config())
    report = model.load_motion_module(str(mm_files[kind]))
    own = model.backbone.state_dict()
    original = mm_files["original"]
    weights = {k: v for k, v in original.items() if "pos_encoder" not in k}
    assert report["loaded"] == len(weights)
    assert report["unexpected"] == []
    for k, v in weights.items():
        assert torch.equal(own[k], v), k
    # only EMO's speed attention has no AnimateDiff counterpart
    assert report["untouched"] == []
    speed = [k for k in own if ".motion_modules." in k and ".speed_" in k]
    assert speed and all(torch.count_nonzero(own[k]) == 0 for k in speed if "speed_attn.to_out.0" in k)
    if kind != "dir":
        assert report["skipped_pe"] == sum("pos_encoder" in k for k in original)


def test_motion_module_matches_diffusers_reference(mm_files, adapter):
    """Numerics of a loaded temporal module == diffusers' AnimateDiffTransformer3D with the same
    weights, once diffusers' GroupNorm is made per-frame as in the original AnimateDiff code
    (diffusers normalises over all frames jointly; mm_sd_v15_v2 was trained per frame)."""
    model = EMOModel(**tiny_emo_config()).eval()
    model.load_motion_module(str(mm_files["safetensors"]))
    ref = adapter.down_blocks[1].motion_modules[0].eval()

    class PerFrameNorm(torch.nn.Module):
        def __init__(self, gn):
            super().__init__()
            self.gn = gn

        def forward(self, x):  # [B, C, F, H, W]
            b, c, f, h, w = x.shape
            y = self.gn(x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w))
            return y.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)

    ref.norm = PerFrameNorm(ref.norm)
    ours = model.backbone.down_blocks[1].motion_modules[0]
    f = 16
    x = torch.randn(2 * f, 32, 4, 4, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = ref(x, num_frames=f)
        got = ours(x, Conditions(context=None, num_frames=f, num_motion_frames=0), "down_blocks.1.motion_modules.0")
    assert (expected - x).abs().max() > 1e-2  # the module is not an identity
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_motion_module_rejects_wrong_size(tmp_path, mm_files):
    state = {k: v for k, v in mm_files["original"].items()}
    key = "down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight"
    state[key] = torch.zeros(48, 48)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="shape mismatch"):
        EMOModel(**tiny_emo_config()).load_motion_module(str(tmp_path / "bad.safetensors"))
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "none.safetensors"))
    with pytest.raises(ValueError, match="not an AnimateDiff motion module"):
        EMOModel(**tiny_emo_config()).load_motion_module(str(tmp_path / "none.safetensors"))


def test_sd15_plus_animatediff_then_save_load(tmp_path, sd_dir, mm_files):
    extra = {k: v for k, v in tiny_emo_config().items() if k not in TINY_UNET and k != "text_context_tokens"}
    model = EMOModel.from_sd15(str(sd_dir), **extra).eval()
    model.load_motion_module(str(mm_files["ckpt"]))
    model.save_pretrained(tmp_path / "emo")
    again = EMOModel.from_pretrained(tmp_path / "emo").eval()
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.config.text_context_tokens == 7
