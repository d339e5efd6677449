"""The three training stages on a tiny model, from shards of real footage: what trains, what
gets gradients, what is saved."""
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("emo_data.shards", reason="data-side shard schema not importable")

from emo_model import EMOModel  # noqa: E402
from emo_model.training import (  # noqa: E402
    TrainConfig,
    load_components,
    reachable_parameter_names,
    train,
    trainable_parameter_names,
    training_loss,
)

from train_helpers import shared_corpus  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_wav2vec):
    return shared_corpus(tmp_path_factory, tiny_wav2vec)


def _config(corpus, stage, out, **kw):
    base = dict(stage=stage, model=corpus["model"], shards=corpus["train"], out=str(out), steps=2, batch_size=1,
                num_workers=0, drop_reference=0, drop_audio=0, drop_motion=0, lr=1e-5, log_with=[], progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("stage", ["image", "video", "speed"])
def test_stage_step(corpus, stage, tmp_path):
    # stage video also runs gradient checkpointing, bf16 autocast and gradient accumulation
    extra = dict(gradient_checkpointing=True, mixed_precision="bf16", grad_accum=2) if stage == "video" else {}
    cfg = _config(corpus, stage, tmp_path / "run", **extra)
    components = load_components(cfg)
    model = components.model
    before = _params(model)
    result = train(cfg, components=components)
    assert len(result["losses"]) == 2 and all(np.isfinite(result["losses"]))
    after = _params(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    trainable = set(trainable_parameter_names(model, stage)) & reachable_parameter_names(model.config, stage)
    assert changed and changed <= trainable  # frozen parameters never move
    if stage == "image":
        assert not any(".motion_modules." in n or "audio" in n or "speed" in n for n in trainable)
        assert any(n.startswith("reference_net.") for n in changed) and any(n.startswith("face_locator.") for n in changed)
    if stage == "video":
        assert any(".motion_modules." in n for n in changed) and any(".audio_attn." in n for n in changed)
        assert not any(".speed_" in n or n.startswith("speed_proj.") for n in trainable)
    if stage == "speed":
        assert any(".speed_attn." in n for n in changed) and any(".motion_modules." in n and ".speed_" not in n for n in changed)
        assert not any("audio" in n for n in trainable)  # audio layers frozen (paper)
        assert not any(n.startswith(("reference_net.", "face_locator.")) for n in trainable)
    # the last checkpoint is a pipeline directory whose emo/ holds exactly the trained weights
    assert result["checkpoint"].endswith("checkpoint-2")
    assert sorted(os.listdir(result["checkpoint"])) == sorted(
        ["audio_encoder", "emo", "feature_extractor", "model_index.json", "scheduler", "train_config.json",
         "training_state", "vae"])
    saved = EMOModel.from_pretrained(os.path.join(result["checkpoint"], "emo")).state_dict()
    assert all(torch.equal(saved[n], after[n]) for n in after)


def test_unreachable_parameters_are_exactly_the_ones_without_gradient():
    """The meta-device probe names the 20 ReferenceNet tensors of the last transformer block
    (after its norm1) in stage image, and nothing in stages video/speed (motion frames read it)."""
    from emo_model.tiny import tiny_emo_config

    config = EMOModel(**tiny_emo_config()).config
    image = set(trainable_parameter_names(EMOModel(**tiny_emo_config()), "image")) - reachable_parameter_names(config, "image")
    assert len(image) == 20 and all(n.startswith("reference_net.up_blocks.3.attentions.1.") for n in image)
    assert not any(n.endswith("norm1.weight") for n in image)
    for stage in ("video", "speed"):
        model = EMOModel(**tiny_emo_config())
        assert set(trainable_parameter_names(model, stage)) <= reachable_parameter_names(config, stage)


@pytest.mark.parametrize("stage", ["image", "video", "speed"])
def test_every_trained_parameter_gets_a_gradient_even_with_all_conditions_dropped(corpus, stage, tmp_path):
    """What DDP without find_unused_parameters needs: with every condition dropped for every
    sample (reference masked, audio/speed zeroed, motion zeroed), each trained parameter still
    receives a gradient, because dropout masks per sample instead of skipping modules."""
    from emo_model.train_data import ItemMaker, MemberReader, check_contract, collate, load_catalog

    cfg = _config(corpus, stage, tmp_path, drop_reference=1.0, drop_audio=1.0, drop_motion=1.0, drop_speed=1.0)
    model, vae, scheduler = load_components(cfg)[:3]
    report = check_contract(load_catalog(corpus["train"]), model.config, stage, 64)
    c = model.config
    maker = ItemMaker(stage, 64, c.num_motion_frames, c.num_frames, c.audio_window, c.speed_window)
    reader = MemberReader()
    batch = collate([maker(ref, np.random.default_rng(i), reader) for i, ref in enumerate(report.usable[:2])])
    names = set(trainable_parameter_names(model, stage)) & reachable_parameter_names(c, stage)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    loss = training_loss(model, vae, scheduler, batch, stage, cfg, torch.Generator().manual_seed(0))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if n in names and p.grad is None]
    assert not missing, missing[:5]


def test_per_sample_dropout_equals_the_unconditional_branch():
    """reference_keep / motion_keep drop conditions per sample: a dropped sample gets exactly what
    sampling's unconditional branch computes (no reference tokens / zero motion features), the
    kept sample is unchanged."""
    from emo_model.tiny import tiny_emo_config

    torch.manual_seed(0)
    model = EMOModel(**tiny_emo_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    g = torch.Generator().manual_seed(1)
    x, ref = torch.randn(2, 4, 12, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    motion, audio = torch.randn(2, 4, 4, 8, 8, generator=g), torch.randn(2, 12, 5, 3, 32, generator=g)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        full = model(x, t, reference_latents=ref, motion_latents=motion, audio_features=audio).sample
        dropped = model(x, t, reference_latents=ref, motion_latents=motion, audio_features=audio,
                        reference_keep=torch.tensor([True, False]), motion_keep=torch.tensor([False, True])).sample
        no_ref = model(x, t, reference_latents=ref, motion_latents=motion, audio_features=audio, use_reference=False).sample
        no_motion = model(x, t, reference_latents=ref, motion_latents=None, audio_features=audio).sample
        neither = model(x[1:], t[1:], reference_latents=ref[1:], motion_latents=motion[1:], audio_features=audio[1:],
                        use_reference=False).sample
    torch.testing.assert_close(dropped[1], neither[0], atol=1e-5, rtol=1e-4)  # sample 1: no reference, motion kept
    torch.testing.assert_close(dropped[1], no_ref[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dropped[0], no_motion[0], atol=1e-5, rtol=1e-4)  # sample 0: reference kept, motion zero
    assert not torch.allclose(dropped[0], full[0], atol=1e-4) and not torch.allclose(dropped[1], full[1], atol=1e-4)
