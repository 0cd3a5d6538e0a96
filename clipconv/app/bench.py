"""Speed and memory of adapters in an open_clip image encoder (random init), as ratios measured in one run.

P1  adapted / plain inference time (fp32, no grad), beside the counted-FLOPs ratio (torch's FlopCounterMode:
    matmuls, convolutions, attention — immune to load from other processes) and the adapted encoder with
    the fused adapter path switched off (`AdaptedModule.fused = False`), which shows what fusing buys;
    The adapted encoder computes its last block for [cls] only (clipconv/adapters/pooled.py); the settings
    "full last block" time it with that block whole, which shows the adapters' own cost beside the plain encoder;
P3  one training step of adapters + a linear head through the frozen trunk / plain inference time, with and
    without gradient checkpointing (and, on CUDA or with --bf16, under bf16 autocast and with the trunk cast
    to bf16), beside its counted-FLOPs ratio (≈ 2 when autograd computes no trunk weight gradients, ≈ 3 if it did);
anchors: the same step with PromptSRC's zero-shot anchors (`--anchor-logits`/`--anchor-features`: one more
    no-grad forward of the frozen encoder per step, clipconv.training.Anchors) / the plain step;
memory: the bytes autograd saves for backward per step (distinct storages, parameters excluded: activations
    and autocast weight copies), with and without checkpointing; peak CUDA memory per step on a GPU.
All timed settings run in rounds, the order reversed every other round, so that load from other processes
hits them alike; in a round each setting is called `inner` times in a row and its fastest call kept (a call
that another process's burst slowed down is dropped); a ratio is the median over rounds of the ratio within
the round, of wall time and of the process's CPU time (with one thread on a shared CPU, CPU time leaves out
the waits for a core), reported with the spread (quartiles) of the within-round ratios.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from clipconv.adapters import (
    adapted_modules, adapter_modules, add_adapters, count_trainable, get_adapter, unpool_last_block
)
from clipconv.app.cli.common import plain_warnings
from clipconv.app.cli.options import add_runtime_args, apply_runtime, runtime_from
from clipconv.backbone import _register_model_config, resolve_device
from clipconv.runtime.jsontypes import JSONObject
from clipconv.runtime.memory import retain_freed_memory
from clipconv.runtime.outputs import write_json
from clipconv.training import Anchors

__all__ = ["BenchConfig", "TARGETS", "run_benchmark", "format_table", "main", "interleaved_times", "paired_ratio",
           "fastest_ratio", "ratio_quartiles", "saved_for_backward_bytes", "forward_gflops", "peak_cuda_bytes"]

MB = 1024 * 1024
#: the project's goals (issue 13, tightened by "Speed and scale"): adapted/plain inference, training step/plain inference
TARGETS = {"adapted_vs_plain_inference": 1.01, "train_step_vs_plain_inference": 2.1}
TARGET_SETTINGS = {"adapted_vs_plain_inference": "infer_adapted", "train_step_vs_plain_inference": "train_fp32"}


@dataclass
class BenchConfig:
    """What to benchmark; every setting is a command-line flag of scripts/benchmark.py."""

    model: str = "ViT-B-16"
    batch: int = 8
    warmup: int = 1
    repeats: int = 7
    #: calls of each setting per round, the fastest kept
    inner: int = 3
    kind: str = "convpass"
    dim: int = 8
    classes: int = 1000
    device: str = "cpu"
    threads: Optional[int] = None
    seed: int = 0
    #: also time bf16 training steps (autocast; trunk cast to bf16); None: on CUDA only (5–6× slower on CPU)
    bf16: Optional[bool] = None
    #: print the top operators of one adapted inference and one training step (torch.profiler); 0 = off
    profile: int = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    _sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def interleaved_times(settings: dict[str, Callable[[], object]], warmup: int, repeats: int, device: torch.device,
                      cpu_seconds: Optional[dict[str, list[float]]] = None, inner: int = 1) -> dict[str, list[float]]:
    """Wall seconds per call of each setting: `warmup` untimed rounds, then `repeats` rounds in turn,
    the order reversed every other round (A B, B A, ...) so that neither setting always runs first; in a round
    each setting is called `inner` times in a row and its fastest call kept (one value per round).
    `cpu_seconds`, if given, receives the process CPU time of each kept call (the least of the round's): with
    one thread on a CPU shared with other jobs, that is the work done, without the time spent waiting for a core."""
    for _ in range(warmup):
        for fn in settings.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in settings}
    order = list(settings)
    for round_index in range(repeats):
        for name in order if round_index % 2 == 0 else order[::-1]:
            calls = [_timed(settings[name], device) for _ in range(max(1, inner))]
            times[name].append(min(wall for wall, _ in calls))
            if cpu_seconds is not None:
                cpu_seconds.setdefault(name, []).append(min(cpu for _, cpu in calls))
    return times


def fastest_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """min(times[numerator]) / min(times[denominator]): each setting's least disturbed call (timeit's advice)."""
    return min(times[numerator]) / min(times[denominator])


def paired_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of times[numerator][i] / times[denominator][i] (settings timed in the same round)."""
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))


def ratio_quartiles(times: dict[str, list[float]], numerator: str, denominator: str) -> tuple[float, float]:
    """The lower and upper quartiles of the within-round ratios (`paired_ratio` is their median): how far
    load from other processes spread them."""
    ratios = [a / b for a, b in zip(times[numerator], times[denominator])]
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    low, _, high = statistics.quantiles(ratios, n=4, method="inclusive")
    return low, high


def saved_for_backward_bytes(step: Callable[[], object], exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves during `step`, storages of `exclude` left out.

    Under non-reentrant gradient checkpointing the inputs of each checkpointed block are saved through
    these hooks and counted; what the block saves internally is recomputed in backward and not."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(storages.values())


def forward_gflops(fn: Callable[[], object]) -> float:
    """GFLOPs torch counts for one call of `fn` (matmuls, convolutions, attention; backward too if it runs);
    NaN where torch's counter cannot follow the call (its module tracker fails on VPT's expanded prompts)."""

    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    except AssertionError:  # torch.utils.module_tracker: "Expected gradient function to be set"
        return float("nan")
    return counter.get_total_flops() / 1e9


def peak_cuda_bytes(step: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak CUDA memory allocated during `step`, or None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def top_operators(fn: Callable[[], object], rows: int) -> list[JSONObject]:
    """The `rows` operators with the most self CPU time in one call of `fn` (torch.profiler)."""

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"name": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:rows]]


def _inference(encoder: nn.Module, images: torch.Tensor, fused: bool = True) -> Callable[[], torch.Tensor]:
    wrappers = adapted_modules(encoder)

    def call() -> torch.Tensor:
        encoder.eval()
        for wrapper in wrappers:
            wrapper.fused = fused
        with torch.no_grad():
            return encoder(images)

    return call


def _counted(encoder: nn.Module, images: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A no-grad forward in train mode, for FlopCounterMode: in eval, nn.MultiheadAttention's fused inference
    kernel runs its matmuls out of the counter's sight (the adapters' dropout changes no FLOPs)."""
    def call() -> torch.Tensor:
        encoder.train()
        with torch.no_grad():
            return encoder(images)

    return call


def _training_step(visual: nn.Module, head: nn.Linear, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                   labels: torch.Tensor, autocast_dtype: Optional[torch.dtype] = None,
                   checkpointing: bool = False) -> Callable[[], None]:
    device_type = images.device.type

    def step() -> None:
        visual.train()
        visual.set_grad_checkpointing(checkpointing)
        optimizer.zero_grad(set_to_none=True)
        context = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with context:
            features = F.normalize(visual(images).float(), dim=-1)
            loss = F.cross_entropy(100.0 * head(features), labels)
        loss.backward()
        optimizer.step()

    return step


def _anchored_step(visual: nn.Module, head: nn.Linear, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                   labels: torch.Tensor, frozen: nn.Module) -> Callable[[], None]:
    """`_training_step` (fp32) plus both zero-shot anchors toward `frozen` with the initial head (as
    clipconv.training.AnchoredClassifierTask computes them)."""
    anchors, head0 = Anchors(1.0, 10.0), copy.deepcopy(head).requires_grad_(False)

    def step() -> None:
        visual.train()
        visual.set_grad_checkpointing(False)
        optimizer.zero_grad(set_to_none=True)
        features = F.normalize(visual(images).float(), dim=-1)
        logits = 100.0 * head(features)
        with torch.no_grad():
            frozen.eval()
            zs_features = F.normalize(frozen(images).float(), dim=-1)
            zs_logits = 100.0 * head0(zs_features)
        loss = F.cross_entropy(logits, labels) + anchors.penalty(logits, zs_logits, features, zs_features)
        loss.backward()
        optimizer.step()

    return step


def _build_encoder(cfg: BenchConfig, device: torch.device) -> nn.Module:


    torch.manual_seed(cfg.seed)
    name = _register_model_config(cfg.model)
    return open_clip.create_model(name, pretrained=None).visual.to(device).eval()


def _optimizer(*modules: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for m in modules for p in m.parameters() if p.requires_grad], lr=1e-5)


def run_benchmark(cfg: BenchConfig) -> JSONObject:
    """Time every setting in interleaved rounds, count FLOPs and saved bytes; return the results
    (times in seconds, memory in MB, ratios as described in the module docstring)."""
    if cfg.batch <= 0 or cfg.repeats <= 0 or cfg.inner <= 0 or cfg.warmup < 0:
        raise ValueError(f"--batch, --repeats and --inner must be positive and --warmup non-negative, got {cfg}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    if device.type == "cpu":
        retain_freed_memory()  # as the Trainer does on CPU
    with_bf16 = device.type == "cuda" if cfg.bf16 is None else cfg.bf16
    plain = _build_encoder(cfg, device)
    for param in plain.parameters():
        param.requires_grad_(False)
    adapted = copy.deepcopy(plain)
    options = {"dim": cfg.dim} if "dim" in {f.name for f in dataclasses.fields(get_adapter(cfg.kind).config)} else {}
    adapters = add_adapters(adapted, cfg.kind, **options)
    whole = copy.deepcopy(adapted)  # the same adapters, the last block whole
    unpool_last_block(whole)
    generator = torch.Generator().manual_seed(cfg.seed)
    size = plain.image_size
    images = torch.randn(cfg.batch, 3, size[0], size[1], generator=generator).to(device)
    labels = torch.randint(0, cfg.classes, (cfg.batch,), generator=generator).to(device)
    head = nn.Linear(int(adapted.output_dim), cfg.classes).to(device)

    settings: dict[str, Callable[[], object]] = {
        "infer_plain": _inference(plain, images),
        "infer_adapted": _inference(adapted, images),
        "infer_adapted_unfused": _inference(adapted, images, fused=False),
        "infer_adapted_full_last_block": _inference(whole, images),
        "train_fp32": _training_step(adapted, head, _optimizer(adapters, head), images, labels),
        "train_fp32_full_last_block": _training_step(whole, head, _optimizer(adapter_modules(whole), head), images,
                                                     labels),
        "train_fp32_checkpointing": _training_step(adapted, head, _optimizer(adapters, head), images, labels,
                                                   checkpointing=True),
        "train_fp32_anchored": _anchored_step(adapted, head, _optimizer(adapters, head), images, labels, plain),
    }
    params = {"train_fp32": [*adapted.parameters(), *head.parameters()]}
    params["train_fp32_checkpointing"] = params["train_fp32"]
    if with_bf16:
        cast = copy.deepcopy(adapted).to(torch.bfloat16)
        adapter_modules(cast).float()  # trunk bf16, adapters fp32
        head_cast = copy.deepcopy(head)
        settings["train_bf16_autocast"] = _training_step(adapted, head, _optimizer(adapters, head), images, labels,
                                                         torch.bfloat16)
        settings["train_bf16_trunk"] = _training_step(cast, head_cast, _optimizer(adapter_modules(cast), head_cast),
                                                      images.to(torch.bfloat16), labels)
        params["train_bf16_autocast"] = params["train_fp32"]
        params["train_bf16_trunk"] = [*cast.parameters(), *head_cast.parameters()]

    gflops = {"plain": forward_gflops(_counted(plain, images)), "adapted": forward_gflops(_counted(adapted, images)),
              "adapted_full_last_block": forward_gflops(_counted(whole, images)),
              "train_step": forward_gflops(settings["train_fp32"])}
    memory = {name: {"saved_for_backward_mb": saved_for_backward_bytes(settings[name], params[name]) / MB,
                     "peak_cuda_mb": (lambda b: None if b is None else b / MB)(peak_cuda_bytes(settings[name], device))}
              for name in params}
    cpu_seconds: dict[str, list[float]] = {}
    times = interleaved_times(settings, cfg.warmup, cfg.repeats, device, cpu_seconds, cfg.inner)
    profile = {}
    if cfg.profile > 0:
        profile = {name: top_operators(settings[name], cfg.profile)
                   for name in ("infer_plain", "infer_adapted", "train_fp32")}

    ratios = {
        "adapted_vs_plain_inference": paired_ratio(times, "infer_adapted", "infer_plain"),
        "unfused_adapted_vs_plain_inference": paired_ratio(times, "infer_adapted_unfused", "infer_plain"),
        "full_last_block_adapted_vs_plain_inference": paired_ratio(times, "infer_adapted_full_last_block",
                                                                   "infer_plain"),
        "full_last_block_train_step_vs_plain_inference": paired_ratio(times, "train_fp32_full_last_block",
                                                                      "infer_plain"),
        "train_step_vs_plain_inference": paired_ratio(times, "train_fp32", "infer_plain"),
        "checkpointed_train_step_vs_plain_inference": paired_ratio(times, "train_fp32_checkpointing", "infer_plain"),
        "anchored_vs_plain_train_step": paired_ratio(times, "train_fp32_anchored", "train_fp32"),
        "adapted_vs_plain_inference_flops": gflops["adapted"] / gflops["plain"],
        "train_step_vs_plain_inference_flops": gflops["train_step"] / gflops["plain"],
    }
    if with_bf16:
        ratios["bf16_autocast_vs_fp32_step"] = paired_ratio(times, "train_bf16_autocast", "train_fp32")
        ratios["bf16_trunk_vs_fp32_step"] = paired_ratio(times, "train_bf16_trunk", "train_fp32")
    cpu_ratios = {name: paired_ratio(cpu_seconds, numerator, "infer_plain") for name, numerator in (
        ("adapted_vs_plain_inference", "infer_adapted"), ("unfused_adapted_vs_plain_inference", "infer_adapted_unfused"),
        ("full_last_block_adapted_vs_plain_inference", "infer_adapted_full_last_block"),
        ("full_last_block_train_step_vs_plain_inference", "train_fp32_full_last_block"),
        ("train_step_vs_plain_inference", "train_fp32"),
        ("checkpointed_train_step_vs_plain_inference", "train_fp32_checkpointing"))}
    cpu_ratios["anchored_vs_plain_train_step"] = paired_ratio(cpu_seconds, "train_fp32_anchored", "train_fp32")
    return {
        "config": asdict(cfg),
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(device),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average_1min_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "encoder": {
            "layers": len(adapted.transformer.resblocks),
            "width": int(adapted.transformer.width),
            "grid": list(adapted.grid_size),
            "trainable_adapter_params": count_trainable(adapters),
            "head_params": sum(p.numel() for p in head.parameters()),
        },
        "seconds": times,
        "median_seconds": {name: statistics.median(values) for name, values in times.items()},
        "cpu_seconds": cpu_seconds,
        "gflops": gflops,
        "ratios": ratios,
        "ratios_of_cpu_time": cpu_ratios,
        "ratios_of_fastest": {name: {"wall": fastest_ratio(times, numerator, "infer_plain"),
                                     "cpu": fastest_ratio(cpu_seconds, numerator, "infer_plain")}
                              for name, numerator in TARGET_SETTINGS.items()},
        "ratio_quartiles": {name: {"wall": ratio_quartiles(times, numerator, "infer_plain"),
                                   "cpu": ratio_quartiles(cpu_seconds, numerator, "infer_plain")}
                            for name, numerator in TARGET_SETTINGS.items()},
        "targets": {name: {"goal": goal, "met": ratios[name] <= goal} for name, goal in TARGETS.items()},
        "memory": memory,
        "profile": profile,
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


LABELS = {
    "infer_plain": "inference, plain encoder",
    "infer_adapted": "inference, adapted encoder (P1)",
    "infer_adapted_unfused": "inference, adapted, fused path off",
    "infer_adapted_full_last_block": "inference, adapted, full last block",
    "train_fp32_full_last_block": "train step, fp32, full last block",
    "train_fp32": "train step, fp32 (P3)",
    "train_fp32_checkpointing": "train step, fp32, gradient checkpointing",
    "train_fp32_anchored": "train step, fp32, zero-shot anchors (frozen forward)",
    "train_bf16_autocast": "train step, bf16 autocast",
    "train_bf16_trunk": "train step, trunk cast to bf16",
}


def format_table(results: JSONObject) -> str:
    """A markdown table of the medians, the within-round ratios to plain inference and memory."""
    cfg, med, mem, env = results["config"], results["median_seconds"], results["memory"], results["environment"]
    times = results["seconds"]
    lines = [
        f"{cfg['model']} {cfg['kind']} h={cfg['dim']}, batch {cfg['batch']}, {cfg['repeats']} interleaved rounds "
        f"(fastest of {cfg['inner']} calls each), "
        f"{env['threads']} threads on {env['device']}; "
        f"{results['encoder']['trainable_adapter_params']:,} adapter parameters",
        "",
        "| setting | median wall s | wall / plain inference | CPU time / plain inference | saved for backward MB "
        "| peak CUDA MB |",
        "|---|---|---|---|---|---|",
    ]
    cpu = results["cpu_seconds"]
    for name in times:
        ratio = paired_ratio(times, name, "infer_plain")
        cpu_ratio = paired_ratio(cpu, name, "infer_plain")
        memory = mem.get(name, {})
        saved = memory.get("saved_for_backward_mb")
        peak = memory.get("peak_cuda_mb")
        lines.append(f"| {LABELS.get(name, name)} | {med[name]:.3f} | {ratio:.3f} | {cpu_ratio:.3f} | "
                     f"{'–' if saved is None else f'{saved:.1f}'} | {'–' if peak is None else f'{peak:.0f}'} |")
    ratios, flops = results["ratios"], results["gflops"]
    lines.append("")
    for name, target in results["targets"].items():
        fastest = results["ratios_of_fastest"][name]
        (wall_low, wall_high), (cpu_low, cpu_high) = (results["ratio_quartiles"][name][k] for k in ("wall", "cpu"))
        lines.append(f"{name}: {ratios[name]:.3f} wall (quartiles {wall_low:.3f}–{wall_high:.3f}), "
                     f"{results['ratios_of_cpu_time'][name]:.3f} CPU time (quartiles {cpu_low:.3f}–{cpu_high:.3f}) "
                     f"(medians of within-round ratios); fastest calls {fastest['wall']:.3f} wall, "
                     f"{fastest['cpu']:.3f} CPU (goal ≤ {target['goal']}: {'met' if target['met'] else 'NOT met'} "
                     "on the median wall ratio)")
    lines.append(f"counted GFLOPs: plain forward {flops['plain']:.2f}, adapted forward {flops['adapted']:.2f} "
                 f"(ratio {ratios['adapted_vs_plain_inference_flops']:.4f}; with the full last block "
                 f"{flops['adapted_full_last_block']:.2f}), training step {flops['train_step']:.2f} "
                 f"(ratio to plain forward {ratios['train_step_vs_plain_inference_flops']:.3f})")
    lines.append(f"anchored_vs_plain_train_step: {ratios['anchored_vs_plain_train_step']:.3f} wall, "
                 f"{results['ratios_of_cpu_time']['anchored_vs_plain_train_step']:.3f} CPU time (zero-shot anchors: "
                 "one more no-grad forward of the frozen encoder per step)")
    for name in ("bf16_autocast_vs_fp32_step", "bf16_trunk_vs_fp32_step"):
        if name in ratios:
            lines.append(f"{name}: {ratios[name]:.2f}")
    for name, rows in results.get("profile", {}).items():
        lines.append(f"\ntop operators, {LABELS.get(name, name)} (self CPU ms, share, calls):")
        lines += [f"  {r['name']:<50} {r['self_ms']:9.1f} {100 * r['share']:5.1f}% {r['calls']:6d}" for r in rows]
    lines.append(f"process peak RSS: {results['process_peak_rss_mb']:.0f} MB; "
                 f"1-min load average at the end: {env['load_average_1min_at_end']}")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[BenchConfig, Optional[Path]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = BenchConfig()
    parser.add_argument("--model", default=defaults.model, help="open_clip model name or model-config JSON")
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed rounds")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="timed rounds of every setting")
    parser.add_argument("--inner", type=int, default=defaults.inner,
                        help="calls of each setting per round, the fastest kept")
    parser.add_argument("--kind", "--method", dest="kind", default=defaults.kind,
                        help="adapter kind (a name in clipconv.adapters.ADAPTERS)")
    parser.add_argument("--dim", type=int, default=defaults.dim, help="adapter bottleneck h")
    parser.add_argument("--classes", type=int, default=defaults.classes, help="head size")
    runtime_fields = add_runtime_args(parser, device=True)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="also time bf16 training steps (default: on CUDA only)")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="list the top ROWS operators of one inference and one training step")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parsed = parser.parse_args(argv)
    runtime = runtime_from(parsed, runtime_fields, parser, defaults={"device": defaults.device})
    apply_runtime(runtime)
    args = {k: v for k, v in vars(parsed).items() if k not in runtime_fields}
    out = args.pop("out")
    return BenchConfig(**args, device=str(resolve_device(runtime.device)), threads=runtime.threads), out


def main(argv: Optional[Sequence[str]] = None) -> JSONObject:
    """Parse flags, run, print the table and write JSON (`--out`)."""
    plain_warnings()
    cfg, out = parse_args(argv)
    return report(run_benchmark(cfg), format_table, out)


def report(results: JSONObject, table: Callable[[JSONObject], str], out: Optional[Path]) -> JSONObject:
    """Print `table(results)` and write the results as JSON to `out` (when given); return them."""

    print(table(results))
    if out is not None:
        write_json(out, results)
        print(f"wrote {out}")
    return results
