"""The shipped miniature CLIP and the pretraining code that made it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from clipconv.app import pretrain_mini_clip as P
from clipconv.backbone import load_backbone
from clipconv.data.demo_world import WORLD_CLASSES, generate_world
from clipconv.mini_clip import MINI_CLIP_CONFIG, MINI_CLIP_WEIGHTS, demo_backbone

TEN_MB = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def mini():
    return demo_backbone(device="cpu")


def test_checkpoint_is_small_and_fp16():
    from safetensors import safe_open

    assert MINI_CLIP_WEIGHTS.stat().st_size <= TEN_MB
    with safe_open(str(MINI_CLIP_WEIGHTS), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float16}
        config = json.loads(handle.metadata()["pretrain_config"])
    assert config["seed"] == 0 and config["steps"] > 0


def test_shipped_model_loads_with_its_geometry(mini):
    cfg = json.loads(MINI_CLIP_CONFIG.read_text())
    grid = mini.visual.grid_size
    assert grid[0] >= 6 and grid[1] >= 6
    assert grid[0] == cfg["vision_cfg"]["image_size"] // cfg["vision_cfg"]["patch_size"]
    assert mini.visual.transformer.width == cfg["vision_cfg"]["width"]
    image = Image.new("RGB", (64, 64), (200, 10, 10))
    assert mini.eval_transform(image).shape == (3, cfg["vision_cfg"]["image_size"], cfg["vision_cfg"]["image_size"])
    tokens = mini.tokenizer(["a photo of a striped star."])
    assert tokens.shape == (1, cfg["text_cfg"]["context_length"])


def test_logit_scale_survives_loading(mini):
    from safetensors.torch import load_file

    stored = load_file(str(MINI_CLIP_WEIGHTS))["logit_scale"].float()
    assert torch.equal(mini.model.logit_scale.detach(), stored)
    assert mini.logit_scale == pytest.approx(float(stored.exp()))
    assert mini.logit_scale != pytest.approx(1 / 0.07, rel=1e-3)  # trained, not the initial value


def test_zero_shot_on_fresh_source_images_beats_chance(mini, tmp_path):
    world = generate_world(tmp_path / "world", seed=11, train_per_class=1, test_per_class=4)
    accuracy = P.zero_shot_accuracy(mini, world, domains=["source"])["source"]
    assert accuracy >= 5 * 100 / len(WORLD_CLASSES)


def test_zero_shot_needs_a_finished_world(mini, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a finished demo world"):
        P.zero_shot_accuracy(mini, tmp_path)


def test_captions_name_the_class_and_style():
    rng = np.random.default_rng(0)
    name = WORLD_CLASSES[7].name
    photo = {P.caption(7, "photo", rng) for _ in range(50)}
    drawing = {P.caption(7, "drawing", rng) for _ in range(50)}
    assert all(name in c for c in photo | drawing)
    assert len(photo) > 3 and any("sketch" in c or "drawing" in c for c in drawing)


def test_pretraining_stream_is_deterministic(tiny_config):
    config = P.PretrainConfig()
    first = P.render_pretrain_batch(0, 10, 6, config, 32)
    again = P.render_pretrain_batch(0, 10, 6, config, 32)
    later = P.render_pretrain_batch(0, 16, 6, config, 32)
    assert first[0].shape == (6, 3, 32, 32) and first[0].dtype == torch.uint8
    assert torch.equal(first[0], again[0]) and list(first[1]) == list(again[1]) and first[2] == again[2]
    assert not torch.equal(first[0], later[0])


def _tiny_run(tiny_config, seed: int):
    torch.manual_seed(123)  # load_backbone seeds its random init itself: only the data seed varies
    backbone = load_backbone(str(tiny_config), pretrained=None, device="cpu")
    config = P.PretrainConfig(seed=seed, steps=3, batch_size=12, pool_size=16, fresh_per_step=4, threads=1)
    summary = P.pretrain(backbone, config, log_every=0)
    return backbone, summary


def test_pretrain_is_deterministic_and_trains(tiny_config):
    first, summary = _tiny_run(tiny_config, seed=0)
    second, _ = _tiny_run(tiny_config, seed=0)
    third, _ = _tiny_run(tiny_config, seed=1)
    assert np.isfinite(summary["final_loss"])
    a, b, c = (m.model.state_dict() for m in (first, second, third))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    torch.manual_seed(0)
    untrained = load_backbone(str(tiny_config), pretrained=None, device="cpu").model.state_dict()
    changed = [k for k in a if not torch.equal(a[k], untrained[k])]
    assert "visual.conv1.weight" in changed and "text_projection" in changed


def test_save_checkpoint_round_trips_through_load_backbone(tiny_backbone, tiny_config, tmp_path):
    with torch.no_grad():
        tiny_backbone.model.logit_scale.fill_(3.25)
    path = P.save_checkpoint(tiny_backbone.model, tmp_path / "w.safetensors", metadata={"seed": 5})
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left behind
    loaded = load_backbone(str(tiny_config), pretrained=str(path), device="cpu")
    assert loaded.logit_scale == pytest.approx(float(torch.tensor(3.25).exp()))
    original = tiny_backbone.model.state_dict()
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, original[key].half().float()), key


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        P.main(["--steps", "0"])
    assert exit_info.value.code == 2
    assert "--steps" in capsys.readouterr().err
