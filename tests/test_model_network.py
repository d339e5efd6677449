"""EMO network: shapes, zero-init (== diffusers SD UNet), save/load, conditions really used."""
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from emo_model import EMOModel, constant_speed_buckets, speed_bucket_encoding, window_frames
from emo_model.conditioning import AudioProjection, FaceLocator, SpeedProjection
from emo_model.tiny import TINY_UNET, tiny_emo_config

torch.set_num_threads(1)  # tiny ops: a second thread only adds sync cost on a busy 2-core box
B, F_, N_MOT, H = 2, 12, 4, 8  # batch, frames, motion frames, latent side
L, D = 3, 32  # tiny wav2vec layers / dims


@pytest.fixture(scope="module")
def sd_unet():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET).eval()
    with torch.no_grad():  # non-trivial GroupNorm/LayerNorm affine params too
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return unet


@pytest.fixture(scope="module")
def model(sd_unet):
    torch.manual_seed(1)
    m = EMOModel(**tiny_emo_config()).eval()
    m.load_sd_unet(sd_unet.state_dict())
    with torch.no_grad():
        m.text_context.normal_()
    return m


def _inputs(f=F_, b=B, seed=2):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(b, 4, f, H, H, generator=g),
        audio=torch.randn(b, f, 5, L, D, generator=g),
        speed=torch.rand(b, f, 9, generator=g) * 2 - 1,
        mask=(torch.rand(b, 1, 8 * H, 8 * H, generator=g) > 0.5).float(),
        ref=torch.randn(b, 4, H, H, generator=g),
        motion=torch.randn(b, N_MOT, 4, H, H, generator=g),
    )


def _randomize_new_layers(m):
    with torch.no_grad():
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)


# ----------------------------------------------------------------------------- helpers
def test_window_frames_edges():
    x = torch.arange(6.0).reshape(1, 6, 1)
    w = window_frames(x, 2, dim=1)
    assert w.shape == (1, 6, 5, 1)
    assert w[0, 0, :, 0].tolist() == [0, 0, 0, 1, 2]
    assert w[0, 3, :, 0].tolist() == [1, 2, 3, 4, 5]
    assert w[0, 5, :, 0].tolist() == [3, 4, 5, 5, 5]


def test_speed_bucket_encoding_formula():
    centers = [0.0, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5]
    radii = [0.05, 0.05, 0.075, 0.1, 0.125, 0.2, 0.25, 0.4, 0.75]
    s = speed_bucket_encoding(0.5)
    assert s.shape == (9,) and s.dtype == np.float32
    np.testing.assert_allclose(s, np.tanh((0.5 - np.array(centers)) / np.array(radii) * 3), rtol=1e-6)
    assert s[4] == 0.0 and s[0] > 0.99 and s[-1] < -0.99  # at a centre the bucket reads 0
    seq = constant_speed_buckets(1.2, 7)
    assert seq.shape == (7, 9) and np.all(seq == seq[0])
    assert speed_bucket_encoding(np.array([0.0, 3.0])).shape == (2, 9)


def test_condition_module_shapes():
    ap = AudioProjection(num_layers=L, feature_dim=D, window=2, hidden_dim=16, num_tokens=4, token_dim=24)
    assert ap(torch.randn(2, 12, 5, L, D)).shape == (2, 12, 4, 24)
    assert ap(torch.randn(2, 12, L, D)).shape == (2, 12, 4, 24)  # windowed inside
    with pytest.raises(ValueError):
        ap(torch.randn(2, 12, 5, L + 1, D))
    sp = SpeedProjection(9, 2, 16, 20)
    assert sp(torch.randn(2, 16, 9)).shape == (2, 16, 20)
    fl = FaceLocator(out_channels=32, channels=(8, 8, 16, 16))
    out = fl(torch.ones(2, 1, 64, 64))
    assert out.shape == (2, 32, 8, 8)
    assert out.abs().max() == 0  # zero-initialised output


# ----------------------------------------------------------------------------- the network
def test_shapes_every_module(model):
    x = _inputs()
    with torch.no_grad():
        ref = model.encode_reference(x["ref"], x["motion"])
        out = model(x["sample"], 10, reference=ref, audio_features=x["audio"], speed_buckets=x["speed"], face_mask=x["mask"]).sample
    assert out.shape == (B, 4, F_, H, H)
    assert torch.isfinite(out).all()
    # ReferenceNet features: one per transformer block (self-attention inputs), one per temporal position
    n_attn = sum(1 for k in model.backbone.state_dict() if k.endswith("attn1.to_q.weight"))
    n_mm = sum(1 for k in model.backbone.state_dict() if k.endswith("temporal_transformer.proj_in.weight"))
    assert len(ref.reference) == n_attn == 3 + 1 + 3 * 2  # down, mid, up (layers_per_block + 1)
    assert len(ref.motion) == n_mm == 4 + 1 + 4 * 2
    k = "down_blocks.0.attentions.0.transformer_blocks.0"
    assert ref.reference[k].shape == (B, H * H, 32)
    assert ref.motion["down_blocks.0.motion_modules.0"].shape == (B * N_MOT, 32, H, H)
    assert ref.motion["mid_block.motion_modules.0"].shape == (B * N_MOT, 64, 1, 1)


def test_zero_init_equals_diffusers_sd_unet_single_frame(model, sd_unet):
    """All new layers at their init -> exactly SD's UNet2DConditionModel (given the text-slot context)."""
    x = _inputs(f=1)
    with torch.no_grad():
        ref = model.encode_reference(x["ref"], x["motion"])
        ours = model(x["sample"], 321, reference=ref, audio_features=x["audio"], speed_buckets=x["speed"],
                     face_mask=x["mask"], use_reference=False).sample
        ours_plain = model(x["sample"], 321).sample
        theirs = sd_unet(x["sample"][:, :, 0], 321, encoder_hidden_states=model.text_context.expand(B, -1, -1)).sample
    torch.testing.assert_close(ours[:, :, 0], theirs, rtol=0, atol=1e-5)  # float32 rounding (outputs ~1)
    torch.testing.assert_close(ours_plain[:, :, 0], theirs, rtol=0, atol=1e-5)  # float32 rounding (outputs ~1)
    # ... and the reference-attention does change the output once a reference is given
    with torch.no_grad():
        with_ref = model(x["sample"], 321, reference=ref).sample
    assert (with_ref[:, :, 0] - theirs).abs().max() > 1e-3


def test_zero_init_video_is_framewise_sd(model, sd_unet):
    """At init the temporal modules are identities: 12 frames == 12 independent SD calls.

    Run in float64 so the tolerance can be ~1e-9 (batched vs per-frame float32 rounding differs).
    """
    x = _inputs(f=F_, b=1)
    m = EMOModel(**tiny_emo_config()).eval()
    m.load_state_dict(model.state_dict())
    m.double()
    unet = UNet2DConditionModel(**TINY_UNET).eval()
    unet.load_state_dict(sd_unet.state_dict())
    unet.double()
    d = {k: v.double() for k, v in x.items()}
    with torch.no_grad():
        ref = m.encode_reference(d["ref"], d["motion"])
        ours = m(d["sample"], 500, reference=ref, audio_features=d["audio"], speed_buckets=d["speed"],
                 face_mask=d["mask"], use_reference=False).sample
        frames = d["sample"][0].permute(1, 0, 2, 3)
        theirs = unet(frames, 500, encoder_hidden_states=m.text_context.expand(F_, -1, -1)).sample
    torch.testing.assert_close(ours[0].permute(1, 0, 2, 3), theirs, rtol=0, atol=1e-9)


def test_every_condition_reaches_the_output(model):
    """Once the zero-initialised layers are trained (here: random), each condition matters."""
    m = EMOModel(**tiny_emo_config()).eval()
    m.load_state_dict(model.state_dict())
    _randomize_new_layers(m)
    x = _inputs(b=1)
    with torch.no_grad():
        ref = m.encode_reference(x["ref"], x["motion"])
        base = dict(reference=ref, audio_features=x["audio"], speed_buckets=x["speed"], face_mask=x["mask"])
        y = m(x["sample"], 10, **base).sample
        variants = {
            "audio": dict(base, audio_features=x["audio"] * 0),
            "speed": dict(base, speed_buckets=-x["speed"]),
            "mask": dict(base, face_mask=1 - x["mask"]),
            "motion": dict(base, reference=m.encode_reference(x["ref"], None)),
            "reference": dict(base, reference=m.encode_reference(-x["ref"], x["motion"])),
        }
        for name, kw in variants.items():
            y2 = m(x["sample"], 10, **kw).sample
            assert (y2 - y).abs().max() > 1e-4, name
        # temporal modules mix frames: changing frame 0 changes frame 11
        s2 = x["sample"].clone()
        s2[:, :, 0] += 1
        y3 = m(s2, 10, **base).sample
        assert (y3[:, :, -1] - y[:, :, -1]).abs().max() > 1e-5


def test_first_clip_uses_zero_motion_features(model):
    m = EMOModel(**tiny_emo_config()).eval()
    m.load_state_dict(model.state_dict())
    _randomize_new_layers(m)
    x = _inputs(b=1)
    with torch.no_grad():
        ref = m.encode_reference(x["ref"], None)
        assert ref.motion is None
        zeros = {k: torch.zeros_like(v) for k, v in m.encode_reference(x["ref"], x["motion"]).motion.items()}
        ref_zero = type(ref)(reference=ref.reference, motion=zeros, num_motion_frames=N_MOT)
        a = m(x["sample"], 10, reference=ref).sample
        b = m(x["sample"], 10, reference=ref_zero).sample
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reference_net_matches_sd_unet(model, sd_unet):
    """The ReferenceNet is SD's UNet: its captured self-attention input equals diffusers' one."""
    x = _inputs(f=1, b=1)
    seen = {}
    blk = sd_unet.down_blocks[1].attentions[0].transformer_blocks[0]
    hook = blk.norm1.register_forward_hook(lambda mod, i, o: seen.setdefault("h", o))
    with torch.no_grad():
        sd_unet(x["ref"], 0, encoder_hidden_states=model.text_context)
        ref = model.encode_reference(x["ref"])
    hook.remove()
    torch.testing.assert_close(ref.reference["down_blocks.1.attentions.0.transformer_blocks.0"], seen["h"], rtol=0, atol=1e-6)


def test_save_load_round_trip(tmp_path, model):
    m = EMOModel(**tiny_emo_config()).eval()
    m.load_state_dict(model.state_dict())
    _randomize_new_layers(m)
    m.save_pretrained(tmp_path / "emo")
    files = sorted(p.name for p in (tmp_path / "emo").iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    m2 = EMOModel.from_pretrained(tmp_path / "emo").eval()
    s1, s2 = m.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    x = _inputs(b=1)
    with torch.no_grad():
        kw = dict(audio_features=x["audio"], speed_buckets=x["speed"], face_mask=x["mask"])
        y1 = m(x["sample"], 7, reference=m.encode_reference(x["ref"], x["motion"]), **kw).sample
        y2 = m2(x["sample"], 7, reference=m2.encode_reference(x["ref"], x["motion"]), **kw).sample
    # same weights bit for bit; outputs agree to float rounding (mmap'd safetensors tensors have a
    # different memory alignment, which can change the BLAS summation order: ~1e-6 here)
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-5)


def test_gradient_checkpointing_same_gradients(model):
    m = EMOModel(**tiny_emo_config())
    m.load_state_dict(model.state_dict())
    _randomize_new_layers(m)
    x = _inputs(f=2, b=1)

    def grads():
        m.zero_grad()
        ref = m.encode_reference(x["ref"], x["motion"])
        out = m(x["sample"], 10, reference=ref, audio_features=x["audio"][:, :2], speed_buckets=x["speed"][:, :2], face_mask=x["mask"]).sample
        out.square().mean().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    g0 = grads()
    m.enable_gradient_checkpointing()
    assert m.backbone.gradient_checkpointing and m.reference_net.gradient_checkpointing
    g1 = grads()
    assert g0.keys() == g1.keys()
    assert any(".motion_modules." in k for k in g0) and any("audio_proj" in k for k in g0)
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], rtol=1e-4, atol=1e-6)


def test_full_size_config_on_meta_device():
    with torch.device("meta"):
        m = EMOModel()
    n_backbone = sum(p.numel() for p in m.backbone.parameters())
    n_ref = sum(p.numel() for p in m.reference_net.parameters())
    # SD1.5 UNet: 859.5 M; the ReferenceNet drops conv_norm_out/conv_out; the backbone adds
    # AnimateDiff-v2-sized temporal modules (~453 M) and audio attention.
    assert 859_000_000 < n_ref + 12_000 < 860_000_000
    assert 1_300_000_000 < n_backbone < 1_500_000_000


def test_bfloat16_forward(model):
    m = EMOModel(**tiny_emo_config()).eval()
    m.load_state_dict(model.state_dict())
    m.to(torch.bfloat16)
    x = _inputs(f=2, b=1)
    with torch.no_grad():
        ref = m.encode_reference(x["ref"].bfloat16(), x["motion"].bfloat16())
        out = m(x["sample"].bfloat16(), 10, reference=ref, audio_features=x["audio"][:, :2], speed_buckets=x["speed"][:, :2], face_mask=x["mask"]).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_inference_caches_and_reference_attention_equivalence(model, monkeypatch):
    """Cached reference / text / audio / speed keys+values (no-grad sampling) give the same output
    as computing everything afresh, and reference-attention equals diffusers' attn1 over the
    concatenated [own; reference] tokens (the AnimateAnyone formulation)."""
    from emo_model.unet import TransformerBlock

    m = EMOModel(**tiny_emo_config()).eval()
    m.load_state_dict(model.state_dict())
    _randomize_new_layers(m)
    x = _inputs(f=4, b=1)
    kw = dict(audio_features=x["audio"][:, :4], speed_buckets=x["speed"][:, :4], face_mask=x["mask"])
    with torch.no_grad():
        ref = m.encode_reference(x["ref"], x["motion"])
        cache = {}
        a = m(x["sample"], 10, reference=ref, cache=cache, **kw).sample
        assert len(ref.kv_cache) == 2 * 10 and len(cache) == 10 + 13  # ref + context per block; audio, speed
        b = m(x["sample"], 10, reference=ref, cache=cache, **kw).sample  # served from the caches
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    fresh = m.encode_reference(x["ref"], x["motion"])  # grad enabled: no caching at all
    c = m(x["sample"], 10, reference=fresh, **kw).sample.detach()
    assert fresh.kv_cache == {}
    torch.testing.assert_close(a, c, rtol=0, atol=1e-5)

    def concat_attn1(self, h, ref_tokens, cond):
        ref_tokens = ref_tokens.repeat_interleave(h.shape[0] // ref_tokens.shape[0], dim=0)
        return self.attn1(h, encoder_hidden_states=torch.cat([h, ref_tokens], dim=1))

    monkeypatch.setattr(TransformerBlock, "_reference_attention", concat_attn1)
    with torch.no_grad():
        d = m(x["sample"], 10, reference=m.encode_reference(x["ref"], x["motion"]), **kw).sample
    torch.testing.assert_close(a, d, rtol=0, atol=1e-5)
