"""``emo-eval generate`` + ``emo-eval score`` end to end: a tiny random EMO pipeline saved and
loaded the real way, a test shard cut from real footage, random-weight metric networks."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import sample

torch.set_num_threads(1)  # tiny pipeline ops: a second thread only adds sync cost on a busy 2-core box


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from emo_model.eval.testing import write_test_weights
    from emo_model.tiny import make_tiny_model

    from shard_fixtures import make_shard

    sample("video/sadtalker__WDA_KatieHill_000.mp4")
    root = tmp_path_factory.mktemp("eval_cli")
    shard = make_shard(str(root / "corpus"), n_samples=2, frames=20, split="test")
    make_shard(str(root / "corpus"), n_samples=1, frames=20, split="train", name="train-000000.tar")
    model = make_tiny_model(str(root / "tiny"))
    weights = str(root / "weights")
    write_test_weights(weights, networks=["inception", "i3d", "syncnet"])
    return root, shard, model, weights


def _generate(setup, out, *extra):
    from emo_model.eval.cli import main

    root, _, model, _ = setup
    return main(["generate", "--model", model, "--shards", str(root / "corpus" / "*.tar"), "--out", str(out),
                 "--steps", "1", "--guidance", "1", "--max-frames", "16", "--quiet", *extra])


def test_generate_then_score(setup, capsys):
    from emo_data.shards import decode_mp4, iter_raw_samples
    from emo_model.eval.cli import main

    root, shard, _, weights = setup
    gen = root / "gen"
    assert _generate(setup, gen) == 0
    assert "2 generated, 0 already done" in capsys.readouterr().out
    keys = [raw["__key__"] for raw in iter_raw_samples(shard)]  # the train sample is left out
    assert sorted(f for f in os.listdir(gen) if f.endswith(".json")) == sorted([f"{k}.json" for k in keys] + ["generate.json"])
    truth = {raw["__key__"]: raw for raw in iter_raw_samples(shard)}
    for key in keys:
        record = json.loads((gen / f"{key}.json").read_text())
        assert record["num_frames"] == 16 and record["ground_truth_frames"] == 20 and record["reference_frame"] == 0
        assert record["split"] == "test" and record["face_region_source"] == "given box"
        frames = decode_mp4((gen / record["files"]["generated"]).read_bytes())
        assert frames.shape == (16, 64, 64, 3)
        # the ground truth beside it: the shard's frames, stream-copied (bit-identical), with audio
        import av

        with av.open(str(gen / record["files"]["ground_truth"])) as c:
            assert c.streams.audio and c.streams.audio[0].codec_context.name == "aac"
        assert np.array_equal(decode_mp4((gen / record["files"]["ground_truth"]).read_bytes()),
                              decode_mp4(truth[key]["mp4"]))

    # resumable: a rerun skips both; other settings are refused instead of mixed in
    stamps = {f: os.path.getmtime(gen / f) for f in os.listdir(gen)}
    assert _generate(setup, gen) == 0
    assert "0 generated, 2 already done" in capsys.readouterr().out
    assert stamps == {f: os.path.getmtime(gen / f) for f in os.listdir(gen) if f in stamps}
    assert _generate(setup, gen, "--seed", "1") == 2
    assert "other settings" in capsys.readouterr().err
    # seeded: another directory, same seed -> the same video bytes
    assert _generate(setup, root / "gen_again") == 0
    for key in keys:
        assert (gen / f"{key}.generated.mp4").read_bytes() == (root / "gen_again" / f"{key}.generated.mp4").read_bytes()

    rc = main(["score", str(gen), "--shards", shard, "--weights-dir", weights, "--fid-frame-stride", "4",
               "--face-frame-stride", "4", "--fvd-resolution", "80", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    print(out)
    result = json.loads((gen / "scores.json").read_text())
    m = result["metrics"]
    assert result["samples"] == 2 and result["frames"] == 32 and not result["errors"]
    for name in ("fid", "fvd", "efid"):
        assert np.isfinite(m[name]["value"]) and m[name]["value"] > 0, name
    for which in ("generated", "ground_truth"):
        assert np.isfinite(m["syncnet"][which]["lse_c"]) and np.isfinite(m["syncnet"][which]["lse_d"])
        assert 0 < m["fsim"][which]["value"] <= 100
    assert m["fsim"]["ground_truth"]["value"] > 90  # real frames of the reference's person
    if "skipped" not in m["sync_offline"]:
        assert np.isfinite(m["sync_offline"]["generated"]["confidence"])
    assert result["sizes"] == [{"generated": 64, "ground_truth": 512, "compared_at": 64}]
    for label in ("FID ↓", "FVD ↓", "SyncNet LSE-C ↑", "F-SIM (dlib)", "E-FID ↓ (landmarks)"):
        assert label in out, label
    assert f"scores: {gen / 'scores.json'}" in out


def test_cli_errors(setup, tmp_path, capsys):
    from emo_model.eval.cli import main

    root, shard, model, _ = setup
    with pytest.raises(SystemExit):
        main(["generate", "--model", model])
    assert main(["generate", "--model", model, "--shards", shard, "--out", str(tmp_path / "g"), "--split", "val"]) == 2
    assert "no samples with split='val'" in capsys.readouterr().err
    assert main(["generate", "--model", model, "--shards", shard, "--out", str(tmp_path / "g"), "--speed", "fast"]) == 2
    assert main(["score", str(tmp_path / "empty"), "--shards", shard, "--quiet"]) == 2
    assert "no generated samples" in capsys.readouterr().err
    assert main(["score", str(tmp_path), "--shards", shard, "--metrics", "fid,psnr"]) == 2
