"""scripts/benchmark.py scale (clipconv.app.bench_scale, clipconv.app.scale_tree): the synthetic tree, the step probe,
the prediction arithmetic and one tiny run through the same code path (no speed claims; the real run is documented
in docs/scale.md and not part of the suite)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import write_tiny_config
from tiny_tasks import LinearTask, fixed_batches

from clipconv.app.bench import saved_for_backward_bytes
from clipconv.app.bench_scale import (
    MEASURES, ProbedTask, ScaleConfig, format_scale_table, parse_args, predict_memory_gb, predict_minutes, run_scale,
    run_steps, scale_methods, write_results
)
from clipconv.app.scale_tree import MANIFEST, TreeSpec, ensure_tree, expected_files, subset_wnids, tree_problem
from clipconv.data import eval_split, resolve_run_classes
from clipconv.prompts import imagenet_classes
from clipconv.training import TrainConfig

TINY_TREE = dict(classes=12, shots=2, eval_per_class=1, size=(16, 12))


def _images(folder):
    return sorted(n for n in os.listdir(folder) if not n.startswith("."))


def test_tree_has_the_real_classes_numeric_v2_folders_and_the_200_class_subsets(tmp_path):
    spec = TreeSpec(**TINY_TREE)
    root, built = ensure_tree(tmp_path / "tree", spec, log=lambda line: None)
    assert built and tree_problem(root, spec) is None
    wnids = [w for w, _ in imagenet_classes()][:12]
    assert sorted(os.listdir(root / "imagenet/images/train")) == wnids
    assert all(len(_images(root / "imagenet/images/train" / w)) == 2 for w in wnids)
    assert sorted(os.listdir(root / "imagenetv2/imagenetv2-matched-frequency-format-val"), key=int) == \
        [str(i) for i in range(12)]
    for name, rel in (("a", "imagenet-adversarial/imagenet-a"), ("r", "imagenet-rendition/imagenet-r")):
        folders = {f for f in os.listdir(root / rel) if f != "README.txt"}
        assert folders == set(wnids) & set(subset_wnids(name)) and len(subset_wnids(name)) == 200
    with pytest.warns(UserWarning):  # -A/-R over few classes warn
        classes = resolve_run_classes(root)
        splits = {n: eval_split(root, n, classes) for n in ("imagenet_v2", "imagenet_a")}
    assert len(classes) == 12 and splits["imagenet_v2"].num_classes == 12
    assert splits["imagenet_a"].num_classes == len(set(wnids) & set(subset_wnids("a")))
    files = sum(len(names) for _, _, names in os.walk(root)) - 3  # the manifest and the -A/-R READMEs
    assert files == expected_files(spec) == json.loads((root / MANIFEST).read_text())["files"]


def test_tree_is_reused_when_verified_and_rebuilt_when_damaged(tmp_path):
    spec = TreeSpec(**TINY_TREE)
    root, _ = ensure_tree(tmp_path / "tree", spec, log=lambda line: None)
    assert ensure_tree(root, spec, log=lambda line: None) == (root, False)
    victim = root / "imagenet/images/train" / _images(root / "imagenet/images/train")[0]
    os.remove(victim / _images(victim)[0])
    assert "holds" in tree_problem(root, spec)
    assert tree_problem(root, TreeSpec(**{**TINY_TREE, "shots": 3})) is not None  # another spec: not reused
    lines = []
    assert ensure_tree(root, spec, log=lines.append) == (root, True) and "rebuilding" in lines[0]
    assert tree_problem(root, spec) is None
    other = tmp_path / "mine"
    (other / "x").mkdir(parents=True)
    with pytest.raises(ValueError, match="not a scale-rehearsal tree"):
        ensure_tree(other, spec)


def test_prediction_arithmetic():
    assert predict_minutes(989e12 * 0.35 * 60, 989.0, 0.35) == pytest.approx(1.0)
    assert predict_minutes(2 * 989e12 * 60, 989.0, 0.5) == pytest.approx(4.0)
    # bf16 frozen weights 2 B, AdamW: master + grad + 2 states = 16 B per trainable, activations halved
    assert predict_memory_gb(10**9, 10**8, 4e9, optimizer_slots=2) == pytest.approx(2.0 + 1.6 + 2.0)
    assert predict_memory_gb(0, 10**9, 0, optimizer_slots=1) == pytest.approx(12.0)


def test_probe_counts_the_first_step_and_times_the_others():
    task = LinearTask(fixed_batches(2))
    probe, steps = run_steps(task, TrainConfig(epochs=7, lr=0.1), torch.device("cpu"), timed=2)
    assert steps == 14  # the full schedule: 7 epochs of 2 batches, though only 3 steps ran
    assert probe.probed and len(probe.seconds) == 2 and all(t >= 0 for t in probe.seconds)
    # forward 5x4 @ 4x3 and the weight gradient (the input needs none): 2 matmuls of 2·5·4·3 FLOPs
    assert probe.flops == 2 * (2 * 5 * 4 * 3)
    batch = fixed_batches(1)[0]  # the same bytes as the encoder benchmark's own count of the step
    step = lambda: task.loss(batch, task.model).total.backward()  # noqa: E731
    assert probe.saved_bytes == saved_for_backward_bytes(step, exclude=list(task.model.parameters())) > batch[0].nbytes
    assert isinstance(probe, ProbedTask) and not probe._open


def test_scale_methods_cover_table2_clip_lora_and_every_adapter_kind():
    names = scale_methods()
    assert names[:7] == ("zero_shot", "linear_probe", "coop", "cocoop", "tip_adapter", "tip_adapter_f", "convpass")
    assert "clip_lora" in names and "adapter:lora" in names and "adapter:convpass" not in names


def test_one_method_one_step_on_a_tiny_clip_writes_both_files(tmp_path, tiny_config):
    cfg = ScaleConfig(model=str(tiny_config), tree=tmp_path / "tree", out=tmp_path / "out", methods=("convpass",),
                      batch=2, steps=1, eval_images=2, text_chunk=4, image_size=(16, 12),
                      **{k: v for k, v in TINY_TREE.items() if k != "size"})
    results = run_scale(cfg, log=lambda line: None)
    (row,) = results["rows"]
    assert row["method"] == "convpass" and row["protocol_steps"] == 50  # 24 images, batch 64: one step per epoch
    assert row["flops_per_step"] > 0 and row["saved_bytes_per_step"] > 0 and row["gpu_peak_gb"] > 0
    assert row["measured_shape"] == "batch 2" and row["cpu_seconds_per_step"] == pytest.approx(
        32 * row["measured_seconds_per_step"])
    per_image = results["encoders"]["train_loader"]["seconds_per_image"]  # 50 epochs x 64 images + 4 val per class
    assert row["loader_cpu_minutes"] == pytest.approx((50 * 64 + 4 * 12) * per_image / 60)
    sets = results["evaluation_path"]["sets"]
    assert sets["imagenet_v2"]["classes"] == 12 and all(s["labels_inside_subset"] for s in sets.values())
    json_path, md_path = write_results(results, cfg.out)
    assert json.loads(json_path.read_text())["rows"][0]["method"] == "convpass"
    assert "| Convpass_CLIP | 50 |" in md_path.read_text() == format_scale_table(results)


def test_every_method_with_its_own_measurement_runs_one_step_on_a_tiny_clip(tmp_path):
    """The methods measured by their own code (not the adapter path), each built as a run builds it: a
    method's task changing its signature must fail here, not an hour into a rehearsal. (A 77-token text
    context, as CLIP's: CoOp's reference 16 context tokens need it.)"""
    names = tuple(MEASURES)
    config = write_tiny_config(tmp_path, text_cfg={"context_length": 77})
    cfg = ScaleConfig(model=str(config), tree=tmp_path / "tree", out=tmp_path / "out", methods=names,
                      batch=2, steps=1, eval_images=2, text_chunk=4, image_size=(16, 12),
                      **{k: v for k, v in TINY_TREE.items() if k != "size"})
    lines: list[str] = []
    results = run_scale(cfg, log=lines.append)
    assert [row["method"] for row in results["rows"]] == list(names)
    measured = [lines[i + 1] for i, line in enumerate(lines) if line.startswith("measuring ")]
    assert len(measured) == len(names) and not any("nan" in line for line in measured), measured
    assert measured[names.index("zero_shot")].startswith("  no training steps (")  # scale.md: "–"


def test_bad_flags_exit_2(tmp_path, capsys):
    (tmp_path / "scale.json").write_text("{}")
    for argv in (["--out", str(tmp_path)], ["--out", str(tmp_path / "scale.json")], ["--methods", "nope"],
                 ["--utilization", "2"]):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(argv)
        assert exit_info.value.code == 2
    assert "finished results are kept" in capsys.readouterr().err
