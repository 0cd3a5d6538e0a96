"""Benchmarks of Convpass on an open_clip image encoder (random init), as ratios within one run.

(a) inference: adapted vs plain encoder forward (fp32, no grad), in seconds and in counted FLOPs
    (torch's FlopCounterMode: matmuls and convs), the latter immune to load from other processes;
(b) one training step of adapters + a linear head: fp32, bf16 autocast, trunk cast to bf16 (adapters fp32);
(c) memory: peak CUDA memory per step on a GPU; everywhere, the bytes autograd saves for backward
    (tensors saved by the step's graph, parameters excluded — activations and autocast weight copies).
Repeats of the compared settings are interleaved so that load from other processes hits them alike.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import adapter_modules, add_adapters, count_trainable

__all__ = ["BenchConfig", "run_benchmark", "format_table", "main"]

MB = 1024 * 1024


@dataclass
class BenchConfig:
    """What to benchmark; every setting is a command-line flag of scripts/benchmark.py."""

    model: str = "ViT-B-16"
    batch: int = 8
    warmup: int = 1
    repeats: int = 3
    kind: str = "convpass"
    dim: int = 8
    classes: int = 1000
    device: str = "cpu"
    threads: Optional[int] = None
    seed: int = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def interleaved_times(settings: dict[str, Callable[[], Any]], warmup: int, repeats: int,
                      device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each setting: `warmup` untimed rounds, then `repeats` rounds in turn,
    the order reversed every other round (A B, B A, ...) so that neither setting always runs first."""
    for _ in range(warmup):
        for fn in settings.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in settings}
    order = list(settings)
    for round_index in range(repeats):
        for name in order if round_index % 2 == 0 else order[::-1]:
            times[name].append(_timed(settings[name], device))
    return times


def saved_for_backward_bytes(step: Callable[[], Any], exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves during `step`, storages of `exclude` left out."""
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


def forward_gflops(fn: Callable[[], Any]) -> float:
    """GFLOPs torch counts for one call of `fn` (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def peak_cuda_bytes(step: Callable[[], Any], device: torch.device) -> Optional[int]:
    """Peak CUDA memory allocated during `step`, or None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def _training_step(visual: nn.Module, head: nn.Linear, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                   labels: torch.Tensor, autocast_dtype: Optional[torch.dtype]) -> Callable[[], None]:
    device_type = images.device.type

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        context = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with context:
            features = F.normalize(visual(images).float(), dim=-1)
            loss = F.cross_entropy(100.0 * head(features), labels)
        loss.backward()
        optimizer.step()

    return step


def _build_encoder(cfg: BenchConfig, device: torch.device) -> nn.Module:
    import open_clip

    from .backbone import _register_model_config

    torch.manual_seed(cfg.seed)
    name = _register_model_config(cfg.model)
    return open_clip.create_model(name, pretrained=None).visual.to(device).eval()


def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    """Run (a), (b), (c) for `cfg` and return the results (times in seconds, memory in MB)."""
    if cfg.batch <= 0 or cfg.repeats <= 0 or cfg.warmup < 0:
        raise ValueError(f"--batch and --repeats must be positive and --warmup non-negative, got {cfg}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    plain = _build_encoder(cfg, device)
    for param in plain.parameters():
        param.requires_grad_(False)
    adapted = copy.deepcopy(plain)
    adapters = add_adapters(adapted, cfg.kind, dim=cfg.dim)
    generator = torch.Generator().manual_seed(cfg.seed)
    size = plain.image_size
    images = torch.randn(cfg.batch, 3, size[0], size[1], generator=generator).to(device)
    labels = torch.randint(0, cfg.classes, (cfg.batch,), generator=generator).to(device)

    def infer(encoder: nn.Module) -> Callable[[], Any]:
        def call() -> Any:
            with torch.no_grad():
                return encoder(images)
        return call

    inference = interleaved_times({"plain": infer(plain), "adapted": infer(adapted)}, cfg.warmup, cfg.repeats, device)
    gflops = {"plain": forward_gflops(infer(plain)), "adapted": forward_gflops(infer(adapted))}
    del plain

    adapted.train()
    cast = copy.deepcopy(adapted).to(torch.bfloat16)
    adapter_modules(cast).float()  # trunk bf16, adapters fp32
    head = nn.Linear(int(adapted.output_dim), cfg.classes).to(device)
    head_cast = copy.deepcopy(head)
    steps = {
        "fp32": _training_step(adapted, head, torch.optim.AdamW([*adapters.parameters(), *head.parameters()], lr=1e-5),
                               images, labels, None),
        "bf16_autocast": _training_step(adapted, head, torch.optim.AdamW([*adapters.parameters(), *head.parameters()],
                                                                         lr=1e-5), images, labels, torch.bfloat16),
        "bf16_trunk": _training_step(cast, head_cast,
                                     torch.optim.AdamW([*adapter_modules(cast).parameters(), *head_cast.parameters()],
                                                       lr=1e-5), images.to(torch.bfloat16), labels, None),
    }
    params = {"fp32": [*adapted.parameters(), *head.parameters()], "bf16_autocast": [*adapted.parameters(), *head.parameters()],
              "bf16_trunk": [*cast.parameters(), *head_cast.parameters()]}
    memory = {name: {"saved_for_backward_mb": saved_for_backward_bytes(step, params[name]) / MB,
                     "peak_cuda_mb": (lambda b: None if b is None else b / MB)(peak_cuda_bytes(step, device))}
              for name, step in steps.items()}
    training = interleaved_times(steps, max(cfg.warmup - 1, 0), cfg.repeats, device)

    median = {k: statistics.median(v) for k, v in {**{f"infer_{k}": v for k, v in inference.items()},
                                                   **{f"train_{k}": v for k, v in training.items()}}.items()}
    return {
        "config": asdict(cfg),
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(device),
            "cpu": platform.processor() or platform.machine(),
            "load_average_1min_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "encoder": {
            "layers": len(adapted.transformer.resblocks),
            "width": int(adapted.transformer.width),
            "grid": list(adapted.grid_size),
            "trainable_adapter_params": count_trainable(adapters),
            "head_params": sum(p.numel() for p in head.parameters()),
        },
        "seconds": {"inference": inference, "training_step": training},
        "median_seconds": median,
        "inference_gflops": gflops,
        "ratios": {
            "adapted_vs_plain_inference": median["infer_adapted"] / median["infer_plain"],
            "adapted_vs_plain_inference_flops": gflops["adapted"] / gflops["plain"],
            "bf16_autocast_vs_fp32_step": median["train_bf16_autocast"] / median["train_fp32"],
            "bf16_trunk_vs_fp32_step": median["train_bf16_trunk"] / median["train_fp32"],
        },
        "memory": memory,
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def format_table(results: dict[str, Any]) -> str:
    """A markdown table of the medians, ratios and memory."""
    cfg, med, mem = results["config"], results["median_seconds"], results["memory"]
    fp32 = med["train_fp32"]
    lines = [
        f"{cfg['model']} {cfg['kind']} h={cfg['dim']}, batch {cfg['batch']}, {cfg['repeats']} repeats, "
        f"{results['environment']['threads']} threads on {results['environment']['device']}; "
        f"{results['encoder']['trainable_adapter_params']:,} adapter parameters",
        "",
        "| measurement | median s | ratio | saved for backward MB | peak CUDA MB |",
        "|---|---|---|---|---|",
        f"| inference, plain encoder | {med['infer_plain']:.3f} | 1.00 | – | – |",
        f"| inference, adapted encoder | {med['infer_adapted']:.3f} | {med['infer_adapted'] / med['infer_plain']:.2f} | – | – |",
    ]
    flops = results["inference_gflops"]
    for name, label in (("fp32", "train step, fp32"), ("bf16_autocast", "train step, bf16 autocast"),
                        ("bf16_trunk", "train step, trunk cast to bf16")):
        peak = mem[name]["peak_cuda_mb"]
        lines.append(f"| {label} | {med['train_' + name]:.3f} | {med['train_' + name] / fp32:.2f} | "
                     f"{mem[name]['saved_for_backward_mb']:.1f} | {'–' if peak is None else f'{peak:.0f}'} |")
    lines.append(f"\ncounted forward GFLOPs: plain {flops['plain']:.2f}, adapted {flops['adapted']:.2f} "
                 f"(ratio {flops['adapted'] / flops['plain']:.4f})")
    lines.append(f"process peak RSS: {results['process_peak_rss_mb']:.0f} MB; "
                 f"1-min load average at the end: {results['environment']['load_average_1min_at_end']}")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[BenchConfig, Optional[Path]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = BenchConfig()
    parser.add_argument("--model", default=defaults.model, help="open_clip model name or model-config JSON")
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed rounds per setting")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="timed rounds per setting")
    parser.add_argument("--kind", "--method", dest="kind", default=defaults.kind,
                        help="adapter kind (a name in clipconv.adapters.ADAPTERS)")
    parser.add_argument("--dim", type=int, default=defaults.dim, help="adapter bottleneck h")
    parser.add_argument("--classes", type=int, default=defaults.classes, help="head size")
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    return BenchConfig(**args), out


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Parse flags, run, print the table and write JSON (`--out`)."""
    from .io import write_json

    cfg, out = parse_args(argv)
    results = run_benchmark(cfg)
    print(format_table(results))
    if out is not None:
        write_json(out, results)
        print(f"wrote {out}")
    return results
