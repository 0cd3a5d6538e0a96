"""scripts/benchmark.py (clipconv.app.bench): its measuring helpers and one run on a tiny model (no speed claims)."""
from __future__ import annotations

import json
from unittest import mock

import pytest
import torch
from torch import nn

from clipconv.adapters import add_adapters


def test_saved_for_backward_bytes_counts_activations_and_skips_excluded_parameters():
    from clipconv.app.bench import saved_for_backward_bytes

    layer = nn.Linear(4, 3)
    inputs = torch.randn(5, 4)
    step = lambda: layer(inputs).sum().backward()  # noqa: E731  (saves the input for the weight grad)
    assert saved_for_backward_bytes(step, exclude=list(layer.parameters())) == inputs.nbytes
    inputs.requires_grad_(True)  # now the weight is saved too, for the input grad
    assert saved_for_backward_bytes(step) == inputs.nbytes + layer.weight.nbytes


def test_frozen_layer_saves_no_input_and_computes_no_weight_gradient():
    """Autograd skips what a frozen weight would need: its input is not saved, its gradient not computed."""
    from clipconv.app.bench import forward_gflops, saved_for_backward_bytes

    layer = nn.Linear(64, 32).requires_grad_(False)
    inputs = torch.randn(16, 64, requires_grad=True)
    step = lambda: layer(inputs).sum().backward()  # noqa: E731
    assert saved_for_backward_bytes(step, exclude=list(layer.parameters())) == 0
    forward = forward_gflops(lambda: layer(inputs))
    assert forward_gflops(step) == pytest.approx(2 * forward)  # forward + input gradient, no weight gradient
    layer.weight.requires_grad_(True)
    assert forward_gflops(step) == pytest.approx(3 * forward)


def test_adapter_training_step_through_the_frozen_trunk_counts_at_most_two_forwards(tiny_backbone):
    """No trunk weight gradients: backward costs at most one forward (matmul FLOPs), not two."""
    from clipconv.app.bench import forward_gflops

    visual = tiny_backbone.visual
    modules = add_adapters(visual, "convpass")
    images = torch.randn(2, 3, *visual.image_size)
    visual.train()  # (in eval, nn.MultiheadAttention's fused fast path hides its matmuls from the counter)
    with torch.no_grad():
        forward = forward_gflops(lambda: visual(images))
    step = lambda: visual(images).sum().backward()  # noqa: E731
    frozen = forward_gflops(step)
    # ≤ 2 forwards: the stem and the first block need no input gradient, which pays for the adapters' weight grads
    assert frozen <= 2 * forward
    visual.requires_grad_(True)  # the same step with trunk weight gradients
    assert forward_gflops(step) > 2.5 * forward
    assert sum(p.numel() for p in modules.parameters()) > 0


def test_interleaved_times_warms_up_then_alternates_settings():
    from clipconv.app.bench import interleaved_times

    calls: list[str] = []
    times = interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                              warmup=1, repeats=3, device=torch.device("cpu"))
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]
    assert [len(v) for v in times.values()] == [3, 3] and all(t >= 0 for v in times.values() for t in v)
    cpu: dict[str, list[float]] = {}
    interleaved_times({"a": lambda: sum(range(10_000))}, warmup=0, repeats=2, device=torch.device("cpu"),
                      cpu_seconds=cpu)
    assert list(cpu) == ["a"] and len(cpu["a"]) == 2 and all(t >= 0 for t in cpu["a"])


def test_interleaved_times_keeps_the_fastest_of_inner_calls():
    from clipconv.app import bench
    from clipconv.app.bench import interleaved_times

    durations = iter([(3.0, 2.0), (1.0, 1.5), (2.0, 0.5), (5.0, 4.0), (4.0, 4.5), (6.0, 5.0)])  # (wall, CPU)
    with mock.patch.object(bench, "_timed", lambda fn, device: next(durations)):
        cpu: dict[str, list[float]] = {}
        times = interleaved_times({"a": lambda: None}, warmup=0, repeats=2, device=torch.device("cpu"),
                                  cpu_seconds=cpu, inner=3)
    assert times == {"a": [1.0, 4.0]} and cpu == {"a": [0.5, 4.0]}  # each round's least wall and least CPU time


def test_ratio_quartiles_spread_the_within_round_ratios():
    from clipconv.app.bench import ratio_quartiles

    times = {"a": [1.0, 2.0, 3.0, 4.0, 5.0], "b": [1.0] * 5}
    assert ratio_quartiles(times, "a", "b") == pytest.approx((2.0, 4.0))
    assert ratio_quartiles({"a": [3.0], "b": [2.0]}, "a", "b") == pytest.approx((1.5, 1.5))


def test_paired_ratio_is_the_median_of_within_round_ratios():
    from clipconv.app.bench import paired_ratio

    times = {"a": [2.0, 9.0, 3.0], "b": [1.0, 10.0, 1.0]}  # the slow round 2 hits both
    assert paired_ratio(times, "a", "b") == pytest.approx(2.0)


def test_fastest_ratio_compares_the_least_disturbed_calls():
    from clipconv.app.bench import fastest_ratio

    assert fastest_ratio({"a": [3.0, 2.5, 9.0], "b": [2.0, 1.0, 4.0]}, "a", "b") == pytest.approx(2.5)


def test_benchmark_runs_on_a_tiny_model_and_reports_every_key(tiny_config, tmp_path, capsys):
    from clipconv.app.bench import main

    out = tmp_path / "bench" / "tiny.json"
    results = main(["--model", str(tiny_config), "--batch", "2", "--warmup", "0", "--repeats", "1", "--inner", "1",
                    "--classes", "5", "--bf16", "--profile", "3", "--out", str(out)])
    assert json.loads(out.read_text())["ratios"] == results["ratios"]
    assert set(results["ratios"]) == {
        "adapted_vs_plain_inference", "unfused_adapted_vs_plain_inference", "train_step_vs_plain_inference",
        "checkpointed_train_step_vs_plain_inference", "adapted_vs_plain_inference_flops",
        "train_step_vs_plain_inference_flops", "bf16_autocast_vs_fp32_step", "bf16_trunk_vs_fp32_step",
        "anchored_vs_plain_train_step", "full_last_block_adapted_vs_plain_inference",
        "full_last_block_train_step_vs_plain_inference"}
    assert all(r > 0 for r in results["ratios"].values())
    # the adapted encoder's last block runs for [cls] only: fewer FLOPs than the plain encoder's, more when whole
    gflops = results["gflops"]
    assert gflops["adapted"] < gflops["plain"] < gflops["adapted_full_last_block"]
    assert set(results["targets"]) == {"adapted_vs_plain_inference", "train_step_vs_plain_inference"}
    assert set(results["ratios_of_cpu_time"]) == {
        "adapted_vs_plain_inference", "unfused_adapted_vs_plain_inference", "train_step_vs_plain_inference",
        "checkpointed_train_step_vs_plain_inference", "anchored_vs_plain_train_step",
        "full_last_block_adapted_vs_plain_inference", "full_last_block_train_step_vs_plain_inference"}
    assert results["cpu_seconds"].keys() == results["seconds"].keys()
    assert {name: set(r) for name, r in results["ratios_of_fastest"].items()} == {
        name: {"wall", "cpu"} for name in results["targets"]}
    assert {name: set(q) for name, q in results["ratio_quartiles"].items()} == {
        name: {"wall", "cpu"} for name in results["targets"]}
    assert set(results["seconds"]) == {"infer_plain", "infer_adapted", "infer_adapted_unfused", "train_fp32",
                                       "train_fp32_checkpointing", "train_bf16_autocast", "train_bf16_trunk",
                                       "train_fp32_anchored", "infer_adapted_full_last_block",
                                       "train_fp32_full_last_block"}
    assert set(results["memory"]) == {"train_fp32", "train_fp32_checkpointing", "train_bf16_autocast",
                                      "train_bf16_trunk"}
    memory = results["memory"]
    assert all(m["saved_for_backward_mb"] > 0 and m["peak_cuda_mb"] is None for m in memory.values())
    # checkpointing keeps the blocks' inputs only
    assert memory["train_fp32_checkpointing"]["saved_for_backward_mb"] < memory["train_fp32"]["saved_for_backward_mb"]
    assert [len(rows) for rows in results["profile"].values()] == [3, 3, 3]
    printed = capsys.readouterr().out
    assert "train step, fp32, gradient checkpointing" in printed and "goal ≤ 2.1" in printed
    assert "train step, fp32, zero-shot anchors (frozen forward)" in printed and "anchored_vs_plain_train_step" in printed
    assert [p.name for p in out.parent.iterdir()] == ["tiny.json"]  # no temp file left behind


def test_benchmark_without_bf16_on_cpu_by_default(tiny_config):
    from clipconv.app.bench import BenchConfig, run_benchmark

    results = run_benchmark(BenchConfig(model=str(tiny_config), batch=1, warmup=0, repeats=1, inner=1, classes=3))
    assert "train_bf16_autocast" not in results["seconds"] and "bf16_trunk_vs_fp32_step" not in results["ratios"]


@pytest.mark.parametrize("kind", ["lora", "bitfit", "vpt_deep", "adaptformer"])
def test_benchmark_runs_every_adapter_kind_including_those_without_a_dim(tiny_config, kind):
    from clipconv.app.bench import BenchConfig, run_benchmark

    results = run_benchmark(BenchConfig(model=str(tiny_config), kind=kind, batch=1, warmup=0, repeats=1, inner=1, classes=3))
    assert results["seconds"] and results["ratios"]


def test_forward_gflops_counts_matmuls():
    from clipconv.app.bench import forward_gflops

    layer = nn.Linear(100, 50, bias=False)
    inputs = torch.randn(20, 100)
    assert forward_gflops(lambda: layer(inputs)) == pytest.approx(2 * 20 * 100 * 50 / 1e9)


def test_benchmark_refuses_bad_sizes(tiny_config):
    from clipconv.app.bench import BenchConfig, run_benchmark

    with pytest.raises(ValueError, match="--batch"):
        run_benchmark(BenchConfig(model=str(tiny_config), batch=0))
