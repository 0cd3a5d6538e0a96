"""The ImageNet-scale rehearsal: every Table-2 method at real shapes on this CPU, and what a GPU run will cost.

    python scripts/benchmark.py scale --quick --threads 2 --out scale-quick

On an ImageNet-shaped synthetic tree (clipconv.app.scale_tree: the 1,000 real classes, 16 JPEGs of 500×375
per class, every evaluation set in its layout) and open_clip ViT-B/16 at random init (224 px), each method runs a
few optimizer steps of its own TrainingTask through the Trainer (clipconv.training) with its reference (`paper`)
configuration. The first step is the warm-up and the probe: torch's FlopCounterMode counts its FLOPs (forward +
backward) and saved-tensor hooks the bytes autograd keeps for backward; the following steps are timed (median).
Where the reference shape does not fit this machine's memory or time, the step runs on a stated part of it and is
extrapolated linearly (`ScaleRow.measured_shape`): images per step for the image-encoder methods, classes for the
prompt learners (CoOp encodes every class each step; CoCoOp every class for every image), both for CLIP-LoRA
(two measured shapes: its text part grows with the classes, its image part with the batch).

The protocol's cost follows from the method's reference schedule (steps = the Trainer's total steps), its
frozen-encoder passes (cached features: CoOp's views, Tip-Adapter's augmented rounds, validation) and text-encoder
passes, each priced by counted FLOPs and divided by `gpu_tflops × utilization` (`predict_minutes`). Peak GPU memory
is bf16 weights + fp32 trainable tensors with their gradients and optimizer state + the saved activations halved
for bf16 (`predict_memory_gb`): an estimate without the CUDA context and the allocator's slack.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import math
import os
import platform
import re
import resource
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from clipconv.app.cli.options import add_runtime_args, apply_runtime, runtime_from
from clipconv.app.scale_tree import TreeSpec, ensure_tree
from clipconv.app.session import Session, open_session
from clipconv.config import BackboneConfig, DataConfig, RuntimeConfig
from clipconv.data import EVAL_SET_SPECS, image_dataset
from clipconv.data.sharded import train_loader
from clipconv.evaluation import evaluate_method
from clipconv.methods import FitContext, build_method
from clipconv.methods.base import METHODS, method_config, table2_methods
from clipconv.methods.clip_lora import _ClipLoRATask
from clipconv.methods.coop import _PromptTask
from clipconv.methods.frozen import text_classifier
from clipconv.methods.linear_probe import make_classifier
from clipconv.methods.prompt_learner import frozen_parameters
from clipconv.methods.tip_adapter import SEARCH_GRIDS, _KeysTask, best_alpha_beta, search_grid
from clipconv.prompts import load_templates
from clipconv.runtime.cache import cache_root
from clipconv.runtime.jsontypes import JSONObject
from clipconv.runtime.memory import retain_freed_memory
from clipconv.runtime.outputs import write_json, write_text
from clipconv.training import Anchors, BatchLoss, ClassifierTask, Forward, TrainConfig, Trainer, TrainingTask

__all__ = ["ScaleConfig", "ScaleRow", "ProbedTask", "predict_minutes", "predict_memory_gb", "scale_methods",
           "run_scale", "measured_line", "format_scale_table", "write_results", "main", "REPORTED"]

GIB = 1024 ** 3
#: images of the full ImageNet evaluation suite (val, -V2, -Sketch, -A, -R)
TEST_IMAGES = sum(spec.expected_images for spec in EVAL_SET_SPECS.values())
#: the protocol's validation split (run.py's default --val-shots 4 per class)
VAL_SHOTS = 4
#: what users and papers report of full runs, with their source; "not reported" otherwise
REPORTED = {
    "coop": "CoOp ImageNet: over 16 GB GPU memory even at batch 1, 'memory grows with the number of classes' "
            "(KaiyangZhou/CoOp#12); ~10 h per run (issue 20, source not found here)",
    "cocoop": "out of memory on ImageNet at 16-24 GB (users' reports, quoted in issue 20)",
    "clip_lora": "not reported",
    "tip_adapter": "not reported", "tip_adapter_f": "not reported", "linear_probe": "not reported",
    "zero_shot": "not reported", "convpass": "not reported",
}
#: a newer method that is not a row here, for scale: GalLoP (ECCV 2024), ImageNet 16-shot
GALLOP = ("GalLoP (ECCV 2024, not a row here): ~6.6 h on 2 GPUs, as its repository reports (issue 20: 6 h 38 min "
          "on two A6000s)")


@dataclass
class ScaleConfig:
    """Every field is a flag of `scripts/benchmark.py scale`; `--quick` picks the small measured shapes."""

    quick: bool = False
    out: Path = Path("scale")
    tree: Optional[Path] = None  # default $CLIPCONV_CACHE/scale-tree-<classes>x<shots>x<eval>
    model: str = "ViT-B-16"
    classes: int = 1000
    shots: int = 16
    eval_per_class: int = 2
    image_size: tuple[int, int] = (500, 375)  # (width, height) of the tree's JPEGs
    methods: tuple[str, ...] = ()  # default: scale_methods()
    batch: int = 8  # images per measured step of the image-encoder methods (reference: the method's batch)
    text_chunk: int = 32  # classes per measured step of the prompt learners and CLIP-LoRA
    steps: int = 3  # timed steps after the probe step
    eval_images: int = 64  # images per evaluation set through the real evaluation path
    gpu: str = "H100 SXM, dense bf16"
    gpu_tflops: float = 989.0
    utilization: float = 0.35
    threads: Optional[int] = None
    seed: int = 1

    def __post_init__(self) -> None:
        if self.quick:
            self.batch, self.text_chunk, self.steps, self.eval_images = 2, 8, 1, 4
            self.eval_per_class = min(self.eval_per_class, 1)
        if min(self.batch, self.text_chunk, self.steps, self.eval_images, self.classes, self.shots) < 1:
            raise ValueError("scale: --batch, --text-chunk, --steps, --eval-images, --classes and --shots must be >= 1")
        if not (0 < self.utilization <= 1 and self.gpu_tflops > 0):
            raise ValueError("scale: --utilization must be in (0, 1] and --gpu-tflops positive")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"scale: unknown method(s) {unknown}; choose from {scale_methods()}")


def scale_methods() -> tuple[str, ...]:
    """Table 2's methods in order, then CLIP-LoRA and every other adapter kind as `adapter:<kind>`."""
    table2 = table2_methods()
    kinds = sorted(n for n in METHODS if n.startswith("adapter:") and n.split(":", 1)[1] not in table2)
    return (*table2, "clip_lora", *kinds)


@dataclass
class ScaleRow:
    """One method's measurements and predictions (seconds, FLOPs, bytes; GPU minutes and GB)."""

    method: str
    label: str
    protocol_steps: int
    reference_shape: str
    measured_shape: str
    extrapolation: str
    flops_per_step: float  # at the reference shape
    cpu_seconds_per_step: float  # at the reference shape (extrapolated when the measured shape is smaller)
    measured_seconds_per_step: float
    measured_examples_per_second: float
    saved_bytes_per_step: float  # at the reference shape, fp32
    peak_rss_bytes: int  # this process during the measurement (the shared model included)
    text_passes_per_step: int
    setup_text_passes: int
    frozen_encoder_images: int
    trainable_params: int
    cache_bytes: float
    loader_cpu_minutes: float  # decoding + augmenting every JPEG the protocol reads (validation once), one core
    gpu_train_minutes: float
    gpu_eval_minutes: float
    gpu_peak_gb: float
    reported: str
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- measuring
def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def reset_peak_rss() -> None:
    """Give freed heap memory back (glibc) and restart the kernel's peak-RSS count (VmHWM) of this process."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """This process's peak resident memory since the last reset (VmHWM; ru_maxrss off Linux)."""
    try:
        found = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        found = None
    if found:
        return int(found.group(1)) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ProbedTask(TrainingTask):
    """A TrainingTask that runs another one and measures its steps: the first step under FlopCounterMode and
    saved-tensor hooks (FLOPs of forward + backward, bytes autograd saves, trainable tensors excluded), the others
    timed from the batch handed out to the end of the optimizer step."""

    def __init__(self, inner: TrainingTask, count_flops: bool = True) -> None:
        self.inner, self.name, self.model, self.data_parallel = inner, inner.name, inner.model, inner.data_parallel
        self.count_flops = count_flops
        self.seconds: list[float] = []
        self.flops = float("nan")
        self.saved_bytes = 0
        self.probed = False
        self._open: list = []
        self._started = 0.0
        self._storages: dict[int, int] = {}
        self._excluded = {p.untyped_storage().data_ptr() for p in inner.trainable().values()}

    def trainable(self) -> dict[str, nn.Parameter]:
        return self.inner.trainable()

    def param_groups(self):
        return self.inner.param_groups()

    def steps_per_epoch(self) -> int:
        return self.inner.steps_per_epoch()

    def examples(self, batch) -> int:
        return self.inner.examples(batch)

    def loss(self, batch, forward: Forward) -> BatchLoss:
        return self.inner.loss(batch, forward)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._excluded:
            self._storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def batches(self, epoch: int, generator: torch.Generator) -> Iterator:
        for batch in self.inner.batches(epoch, generator):
            if not self.probed and not self._open:
                contexts = [torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)]
                if self.count_flops:
                    contexts.insert(0, FlopCounterMode(display=False))
                for context in contexts:
                    context.__enter__()
                    self._open.append(context)
            self._started = time.perf_counter()
            yield batch

    def close(self) -> None:
        """Leave the probe's contexts, innermost first (also after a failed step)."""
        while self._open:
            context = self._open.pop()
            context.__exit__(None, None, None)
            if isinstance(context, FlopCounterMode):
                self.flops = float(context.get_total_flops())

    def after_step(self) -> None:
        self.inner.after_step()
        elapsed = time.perf_counter() - self._started
        if self.probed:
            self.seconds.append(elapsed)
            return
        self.close()
        self.saved_bytes = sum(self._storages.values())
        self.probed = True


def run_steps(task: TrainingTask, cfg: TrainConfig, device: torch.device, timed: int) -> tuple[ProbedTask, int]:
    """One probe step then `timed` timed steps of `task` through the Trainer (its optimizer, schedule, autocast);
    returns the probe and the total steps of the full schedule (the Trainer's count, before it is cut short).
    FLOPs are NaN where torch's counter cannot follow the step (its module tracker and VPT's expanded prompts)."""
    for count_flops in (True, False):
        probe = ProbedTask(task, count_flops)
        trainer = Trainer(probe, cfg, device, log=lambda line: None)
        protocol_steps = trainer.total_steps
        trainer.total_steps = 1 + timed
        try:
            while trainer.step < trainer.total_steps:
                trainer.train_epoch()
            return probe, protocol_steps
        except AssertionError:  # torch.utils.module_tracker: "Expected gradient function to be set"
            if not count_flops:
                raise
        finally:
            probe.close()
    raise AssertionError("unreachable")


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _counted(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------- predicting
def predict_minutes(flops: float, gpu_tflops: float, utilization: float) -> float:
    """Minutes of `flops` at `utilization` × `gpu_tflops` TFLOP/s."""
    return flops / (gpu_tflops * 1e12 * utilization) / 60.0


def predict_memory_gb(frozen_params: int, trainable_params: int, saved_fp32_bytes: float,
                      optimizer_slots: int) -> float:
    """GB of one bf16 training run: frozen weights in bf16 (2 B), trainable tensors as fp32 master + gradient +
    `optimizer_slots` fp32 states (AdamW 2, SGD with momentum 1), activations saved for backward in bf16 (the
    fp32 bytes measured here, halved). No CUDA context, no allocator slack."""
    return (2 * frozen_params + 4 * (2 + optimizer_slots) * trainable_params + saved_fp32_bytes / 2) / 1e9


# ----------------------------------------------------------------------------------------------- the methods
@dataclass
class Bench:
    """What every method's measurement shares: the session on the tree, the K-shot split, the encoders' costs."""

    cfg: ScaleConfig
    session: Session
    train: list
    image_flops: float = 0.0  # one image through the frozen image encoder (counted)
    text_flops: float = 0.0  # one prompt through the text encoder (counted)
    text_seconds: float = 0.0
    image_seconds: float = 0.0
    loader_seconds: float = float("nan")  # decoding + augmenting one training JPEG (`probe_loader`)
    log: Callable[[str], None] = print

    @property
    def device(self) -> torch.device:
        return self.session.device

    @property
    def classes(self) -> int:
        return len(self.session.classes)

    @property
    def dim(self) -> int:
        return int(self.session.backbone.model.visual.output_dim)

    def ctx(self, classes: Optional[int] = None, train: Optional[list] = None, features: object = None) -> FitContext:
        names = list(self.session.classes.names)[:classes or self.classes]
        return FitContext(backbone=self.session.backbone, classnames=names, data_root=self.session.data_root,
                          train=self.train if train is None else train, features=features, device=self.device,
                          seed=self.cfg.seed, eval_batch_size=self.session.runtime.eval_batch_size, log=self.log)

    def head(self) -> nn.Linear:
        """A 1,000-class head of the text head's shape (its values do not matter at random init)."""
        generator = torch.Generator().manual_seed(self.cfg.seed)
        head = nn.Linear(self.dim, self.classes)
        with torch.no_grad():
            head.weight.copy_(F.normalize(torch.randn(self.classes, self.dim, generator=generator), dim=-1))
            head.bias.zero_()
        return head.to(self.device)

    def features(self, count: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.cfg.seed)
        return (torch.randn(count, self.dim, generator=generator),
                torch.arange(count) % classes)


class SyntheticFeatures:
    """Stands in for the FeatureStore of the frozen-encoder methods: random features of the encoder's width (the
    cost of encoding is priced separately, per image, from the real encoder)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def encode(self, root, samples, transform="eval", rounds=1, seed=0, desc="", with_labels=False,
               transform_name=None):
        generator = torch.Generator().manual_seed(seed)
        feats = torch.randn(len(samples), self.dim, generator=generator)
        labels = torch.tensor([int(label) for _, label in samples], dtype=torch.long)
        return (feats, labels) if with_labels else feats


def _step_numbers(probe: ProbedTask, factor: float) -> dict[str, float]:
    seconds = statistics.median(probe.seconds) if probe.seconds else float("nan")
    return {"flops": probe.flops * factor, "seconds": seconds * factor, "measured_seconds": seconds,
            "saved": probe.saved_bytes * factor}


def _count(params: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


def measure_adapter(bench: Bench, name: str) -> dict:
    """An adapter-tuning method (convpass, adapter:<kind>): its ClassifierTask on the tree's JPEGs."""
    config = method_config(name, "paper")
    method = build_method(name, config)
    ctx = bench.ctx()
    classifier = method.build(ctx, head=bench.head())
    reference = config.batch_size
    batch = min(bench.cfg.batch, reference)
    backbone = bench.session.backbone
    train_cfg = config.train_config(ctx)

    def make_loader(generator: torch.Generator):
        dataset = image_dataset(ctx.data_root, ctx.train, backbone.train_transform, on_error="skip")
        return train_loader(dataset, batch, 0, generator, what=str(ctx.data_root))

    steps_per_epoch = math.ceil(len(ctx.train) / reference)
    task = ClassifierTask(classifier, make_loader, steps_per_epoch, train_cfg.l2sp, None, bench.device)
    probe, steps = run_steps(task, train_cfg, bench.device, bench.cfg.steps)
    trainable = _count(task.trainable().values())
    factor = reference / batch
    return {**_step_numbers(probe, factor), "protocol_steps": steps, "batch": batch,
            "loaded_images": steps * reference + VAL_SHOTS * bench.classes,  # validation decoded once
            "reference_shape": f"batch {reference}", "measured_shape": f"batch {batch}",
            "extrapolation": f"x{factor:g} (images per step)" if factor != 1 else "none",
            "examples_per_second": batch / statistics.median(probe.seconds) if probe.seconds else float("nan"),
            "trainable": trainable, "frozen": _count(backbone.model.parameters()) + _count(
                p for p in classifier.visual.parameters() if not p.requires_grad),
            "optimizer_slots": 2, "text_per_step": 0, "setup_text": bench.classes,
            "frozen_images": VAL_SHOTS * bench.classes * config.epochs // config.eval_every,
            "cache_bytes": len(ctx.train) * 3 * bench.cfg.image_size[0] * bench.cfg.image_size[1],
            "notes": [f"validation: {VAL_SHOTS} images per class every {config.eval_every} epoch(s) (--val-shots "
                      f"{VAL_SHOTS}); cache: the decoded K-shot images (uint8, 500x375)"]}


def measure_prompts(bench: Bench, name: str) -> dict:
    """CoOp / CoCoOp: the prompt task on cached features, the text encoder over a chunk of the classes."""
    config = method_config(name, "paper")
    method = build_method(name, config)
    chunk = min(bench.cfg.text_chunk, bench.classes)
    ctx = bench.ctx(classes=chunk)
    method.setup(ctx)
    views = [bench.features(len(bench.train), chunk)]
    task = _PromptTask(method, views, bench.device)
    with frozen_parameters(bench.session.backbone.model):
        probe, steps = run_steps(task, method.train_config(ctx), bench.device, bench.cfg.steps)
    factor = bench.classes / chunk
    per_step = config.batch_size * bench.classes if name == "cocoop" else bench.classes
    views_used = min(config.views, config.epochs) or 1
    return {**_step_numbers(probe, factor), "protocol_steps": steps,
            "reference_shape": f"batch {config.batch_size}, {bench.classes} classes",
            "measured_shape": f"batch {config.batch_size}, {chunk} classes",
            "extrapolation": f"x{factor:g} (classes through the text encoder)" if factor != 1 else "none",
            "examples_per_second": config.batch_size / statistics.median(probe.seconds),
            "trainable": _count(task.trainable().values()), "frozen": _count(bench.session.backbone.model.parameters()),
            "optimizer_slots": 1, "text_per_step": per_step, "setup_text": 0,
            "frozen_images": views_used * len(bench.train) + VAL_SHOTS * bench.classes,
            "cache_bytes": views_used * len(bench.train) * bench.dim * 4,
            "eval_text_per_image": bench.classes if name == "cocoop" else 0,
            "notes": [f"{views_used} augmented views of the train set encoded once (cache: their features)"]}


def measure_clip_lora(bench: Bench) -> dict:
    """CLIP-LoRA: its task at two shapes (the text part grows with the classes, the image part with the batch)."""
    config = method_config("clip_lora", "paper")
    reference = config.batch_size
    batch = min(bench.cfg.batch, reference)
    chunk = min(bench.cfg.text_chunk, max(1, bench.classes // 2))
    runs = []
    for classes in (chunk, 2 * chunk):
        method = build_method("clip_lora", dataclasses.replace(config, batch_size=batch))
        ctx = bench.ctx(classes=classes, train=[(p, label % classes) for p, label in bench.train])
        method.build(ctx)
        train = method.train_config(ctx, bench.cfg.shots)
        task = _ClipLoRATask(method, ctx, Anchors.of(train))  # paper: none
        torch.manual_seed(bench.cfg.seed)
        probe, steps = run_steps(task, train, bench.device, bench.cfg.steps)
        runs.append((_step_numbers(probe, 1.0), steps))
        trainable = _count(task.trainable().values())
        frozen = _count(p for p in method.model.parameters() if not p.requires_grad)
        del method, task
    (first, steps), (second, _) = runs
    out = {}
    for key in ("flops", "seconds", "saved"):
        per_class = max(0.0, (second[key] - first[key]) / chunk)
        image = max(0.0, first[key] - per_class * chunk)
        out[key] = image * reference / batch + per_class * bench.classes
    out["measured_seconds"] = first["measured_seconds"]
    return {**out, "protocol_steps": steps, "loaded_images": steps * reference,
            "reference_shape": f"batch {reference}, {bench.classes} classes",
            "measured_shape": f"batch {batch}, {chunk} and {2 * chunk} classes",
            "extrapolation": "image part x batch, text part x classes (from the two shapes)",
            "examples_per_second": batch / first["measured_seconds"],
            "trainable": trainable, "frozen": frozen + _count(bench.session.backbone.model.parameters()),
            "optimizer_slots": 2, "text_per_step": bench.classes, "setup_text": 2 * bench.classes,
            "frozen_images": 0, "cache_bytes": 0.0, "eval_text_per_image": 0,
            "notes": ["every step re-encodes all classes with gradients into the text encoder's LoRA"]}


def measure_tip_f(bench: Bench) -> dict:
    """Tip-Adapter-F: its keys task at the reference shape (16,000 keys, 1,000 classes, batch 256)."""
    config = method_config("tip_adapter_f", "paper")
    method = build_method("tip_adapter_f", config)
    feats, labels = bench.features(len(bench.train), bench.classes)
    method.keys = F.normalize(feats, dim=-1).to(bench.device)
    method.values = F.one_hot(labels, bench.classes).float().to(bench.device)
    method.class_weights = bench.head().weight.detach()
    method.logit_scale = bench.session.backbone.logit_scale
    method._augment, method._augment_name = None, "synthetic"
    ctx = bench.ctx(features=SyntheticFeatures(bench.dim))
    task = _KeysTask(method, ctx, None)
    probe, steps = run_steps(task, method.train_config(ctx), bench.device, bench.cfg.steps)
    n = len(bench.train)
    return {**_step_numbers(probe, 1.0), "protocol_steps": steps,
            "reference_shape": f"batch {config.batch_size}, {n} keys", "measured_shape": "the reference",
            "extrapolation": "none", "examples_per_second": config.batch_size / statistics.median(probe.seconds),
            "trainable": n * bench.dim, "frozen": _count(bench.session.backbone.model.parameters()),
            "optimizer_slots": 2, "text_per_step": 0, "setup_text": 7 * bench.classes,
            "frozen_images": (config.augment_rounds + config.epochs) * n + VAL_SHOTS * bench.classes,
            "cache_bytes": n * (bench.dim + bench.classes) * 4.0, "eval_text_per_image": 0,
            "notes": [f"keys from {config.augment_rounds} augmented rounds + a fresh view per epoch; cache: keys + "
                      "one-hot values"]}


def measure_tip(bench: Bench) -> dict:
    """Tip-Adapter: no training; its α/β search (one β of the grid measured at the reference shape)."""
    config = method_config("tip_adapter", "paper")
    (betas_high, betas), (alphas_high, alphas) = SEARCH_GRIDS[config.search]
    n, val = len(bench.train), VAL_SHOTS * bench.classes
    keys, labels = bench.features(n, bench.classes)
    val_feats, val_labels = bench.features(val, bench.classes)
    args = (val_feats, val_labels, bench.head().weight.detach(), F.normalize(keys, dim=-1),
            F.one_hot(labels, bench.classes).float(), 100.0, search_grid(betas_high, betas)[:1],
            search_grid(alphas_high, alphas))
    flops = _counted(lambda: best_alpha_beta(*args))
    seconds = _timed(lambda: best_alpha_beta(*args))
    return {"flops": flops, "seconds": seconds, "measured_seconds": seconds, "saved": 0.0, "protocol_steps": betas,
            "reference_shape": f"{val} val features x {n} keys, {alphas} alphas per beta",
            "measured_shape": "the reference, one beta", "extrapolation": "none (a step = one beta of the search)",
            "examples_per_second": val / seconds, "trainable": 0,
            "frozen": _count(bench.session.backbone.model.parameters()), "optimizer_slots": 0, "text_per_step": 0,
            "setup_text": 7 * bench.classes, "frozen_images": config.augment_rounds * n + val,
            "cache_bytes": n * (bench.dim + bench.classes) * 4.0, "eval_text_per_image": 0,
            "notes": [f"no training; steps = the {betas} betas of the alpha/beta search on the validation features"]}


def measure_linear_probe(bench: Bench) -> dict:
    """The linear probe: scikit-learn's L-BFGS at the reference shape, a few iterations timed (CPU only)."""
    config = method_config("linear_probe", "paper")
    feats, labels = bench.features(len(bench.train), bench.classes)
    iterations = 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make_classifier(config.default_C, iterations)
        seconds = _timed(lambda: model.fit(feats.numpy(), labels.numpy()))
    per_iteration = seconds / max(1, int(np.max(model.n_iter_)))
    fits = 7 + 2 * config.bisection_steps + 1
    return {"flops": float("nan"), "seconds": per_iteration, "measured_seconds": per_iteration, "saved": 0.0,
            "protocol_steps": fits * config.max_iter,
            "reference_shape": f"{len(bench.train)} x {bench.dim} features, {bench.classes} classes",
            "measured_shape": f"the reference, {iterations} L-BFGS iterations",
            "extrapolation": "none (a step = one L-BFGS iteration)",
            "examples_per_second": len(bench.train) / per_iteration,
            "trainable": bench.classes * (bench.dim + 1), "frozen": _count(bench.session.backbone.model.parameters()),
            "optimizer_slots": 0, "text_per_step": 0, "setup_text": 0,
            "frozen_images": len(bench.train) + VAL_SHOTS * bench.classes,
            "cache_bytes": (len(bench.train) + VAL_SHOTS * bench.classes) * bench.dim * 4.0, "eval_text_per_image": 0,
            "cpu_only": True,
            "notes": [f"scikit-learn on the CPU: steps = {fits} fits (lpclip's C search + the final fit) x max_iter "
                      f"{config.max_iter}, an upper bound (L-BFGS may stop earlier); GPU minutes are the features "
                      "only"]}


def measure_zero_shot(bench: Bench) -> dict:
    """Zero-shot CLIP: no training; the text classifier, measured on a chunk of the classes."""
    config = method_config("zero_shot", "paper")
    templates = load_templates(config.templates or "photo")
    return {"flops": float("nan"), "seconds": float("nan"), "measured_seconds": float("nan"), "saved": 0.0,
            "protocol_steps": 0, "no_steps": True,
            "reference_shape": f"{bench.classes} classes x {len(templates)} template(s)",
            "measured_shape": f"{min(bench.cfg.text_chunk, bench.classes)} classes (the text encoder's cost per "
                              "prompt)",
            "extrapolation": "x classes",
            "examples_per_second": 1.0 / bench.text_seconds if bench.text_seconds else 0.0,
            "trainable": 0, "frozen": _count(bench.session.backbone.model.parameters()), "optimizer_slots": 0,
            "text_per_step": 0, "setup_text": bench.classes * len(templates), "frozen_images": 0,
            "cache_bytes": bench.classes * bench.dim * 4.0, "eval_text_per_image": 0,
            "notes": ["no training; the cost is the text classifier and the evaluation"]}


# ----------------------------------------------------------------------------------------------- shared probes
class RandomHeadScorer:
    """A frozen-encoder scorer with a fixed head (what the evaluation path needs; the values do not matter)."""

    frozen_image_encoder = True

    def __init__(self, weight: torch.Tensor, logit_scale: float) -> None:
        self.weight, self.logit_scale = weight, logit_scale

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * F.normalize(features.float(), dim=-1) @ self.weight.t()

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("scores cached features only")


def probe_encoders(bench: Bench) -> JSONObject:
    """Counted FLOPs of one image and one prompt through the frozen encoders (train mode: in eval,
    nn.MultiheadAttention's fused kernel hides its matmuls from the counter), and the text encoder's seconds
    per prompt on the zero-shot path (`text_classifier`) over a chunk of the classes."""
    model, backbone = bench.session.backbone.model, bench.session.backbone
    size = model.visual.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    chunk = min(bench.cfg.text_chunk, bench.classes)
    tokens = backbone.tokenizer([f"a photo of a {name}." for name in list(bench.session.classes.names)[:chunk]])
    model.train()
    try:
        with torch.no_grad():
            bench.image_flops = _counted(lambda: model.visual(torch.zeros(1, 3, *size)))
            bench.text_flops = _counted(lambda: model.encode_text(tokens)) / chunk
    finally:
        model.eval()
    ctx = bench.ctx(classes=chunk)
    text_classifier(ctx, ["a photo of a {}."])  # warm-up
    bench.text_seconds = _timed(lambda: text_classifier(ctx, ["a photo of a {}."])) / chunk
    return {"image_gflops": bench.image_flops / 1e9, "text_gflops_per_prompt": bench.text_flops / 1e9,
            "text_seconds_per_prompt": bench.text_seconds, "text_chunk": chunk}


def probe_loader(bench: Bench, batches: int = 3) -> JSONObject:
    """CPU seconds per image of the training loader (decode + the protocol's RandomResizedCrop + flip), the one
    the image-trained methods use: the median over `batches` batches after the first (the loader's start)."""
    backbone = bench.session.backbone
    dataset = image_dataset(bench.session.data_root, bench.train, backbone.train_transform, on_error="skip")
    loader = iter(train_loader(dataset, bench.cfg.batch, 0, torch.Generator().manual_seed(bench.cfg.seed),
                               what=str(bench.session.data_root)))
    next(loader)
    seconds = [_timed(lambda: next(loader)) / bench.cfg.batch for _ in range(batches)]
    bench.loader_seconds = statistics.median(seconds)
    return {"seconds_per_image": bench.loader_seconds, "batch": bench.cfg.batch, "batches": batches}


def evaluation_path(bench: Bench) -> JSONObject:
    """The real evaluation path (split mapping, FeatureStore encoding, restricted argmax, metrics) on
    `eval_images` images of every set: -V2 read from its numeric folders, -A/-R scored over their own classes.
    Returns per set its images, the classes its argmax is over, and whether every label lies in its subset."""
    session, n = bench.session, bench.cfg.eval_images
    splits = [dataclasses.replace(split, samples=split.samples[::max(1, len(split.samples) // n)][:n])
              for split in session.splits]
    scorer = RandomHeadScorer(bench.head().weight.detach(), session.backbone.logit_scale)
    labels_seen: dict[str, torch.Tensor] = {}
    started = time.perf_counter()
    metrics = evaluate_method(scorer, splits, session.data_root, bench.device, features=session.store,
                              eval_transform=session.backbone.eval_transform,
                              batch_size=session.runtime.eval_batch_size, log=lambda line: None,
                              on_logits=lambda name, logits, labels: labels_seen.__setitem__(name, labels))
    seconds = time.perf_counter() - started
    images = sum(len(s.samples) for s in splits)
    bench.image_seconds = seconds / max(1, images)
    sets = {}
    for split in splits:
        labels = labels_seen.get(split.name, torch.empty(0, dtype=torch.long))
        inside = split.subset is None or bool(torch.isin(labels, torch.tensor(split.subset)).all())
        sets[split.name] = {"images": len(split.samples), "classes": int(metrics[split.name]["classes"]),
                            "subset": None if split.subset is None else len(split.subset),
                            "labels_inside_subset": inside, "pool": len(next(
                                s for s in session.splits if s.name == split.name).samples)}
    return {"seconds": seconds, "images": images, "seconds_per_image": bench.image_seconds, "sets": sets}


# ----------------------------------------------------------------------------------------------- the run
MEASURES: dict[str, Callable[[Bench], dict]] = {
    "zero_shot": measure_zero_shot, "linear_probe": measure_linear_probe, "tip_adapter": measure_tip,
    "tip_adapter_f": measure_tip_f, "clip_lora": measure_clip_lora,
    "coop": lambda bench: measure_prompts(bench, "coop"), "cocoop": lambda bench: measure_prompts(bench, "cocoop"),
}


def measure(bench: Bench, name: str) -> ScaleRow:
    """Measure method `name` and predict its full protocol."""
    cfg = bench.cfg
    reset_peak_rss()
    started = time.perf_counter()
    m = MEASURES[name](bench) if name in MEASURES else measure_adapter(bench, name)
    rss = peak_rss_bytes()
    notes = list(m["notes"])
    flops = m["flops"]
    train = flops * m["protocol_steps"] if not (m.get("cpu_only") or m.get("no_steps")) else 0.0
    if math.isnan(flops) and not m.get("no_steps"):
        notes.append("FLOPs not counted (torch's counter cannot follow this step): GPU training minutes unknown"
                     if not m.get("cpu_only") else
                     f"CPU time of the search: {m['seconds'] * m['protocol_steps'] / 60:.0f} min (upper bound)")
    setup = m["setup_text"] * bench.text_flops + m["frozen_images"] * bench.image_flops
    evaluation = TEST_IMAGES * (bench.image_flops + m.get("eval_text_per_image", 0) * bench.text_flops)
    notes.append(f"measured in {time.perf_counter() - started:.0f} s")
    spec = METHODS[name]
    return ScaleRow(
        method=name, label=spec.label or name, protocol_steps=int(m["protocol_steps"]),
        reference_shape=m["reference_shape"], measured_shape=m["measured_shape"], extrapolation=m["extrapolation"],
        flops_per_step=flops, cpu_seconds_per_step=m["seconds"], measured_seconds_per_step=m["measured_seconds"],
        measured_examples_per_second=m["examples_per_second"], saved_bytes_per_step=m["saved"], peak_rss_bytes=rss,
        text_passes_per_step=int(m["text_per_step"]), setup_text_passes=int(m["setup_text"]),
        frozen_encoder_images=int(m["frozen_images"]), trainable_params=int(m["trainable"]),
        cache_bytes=float(m["cache_bytes"]),
        loader_cpu_minutes=m.get("loaded_images", m["frozen_images"]) * bench.loader_seconds / 60.0,
        gpu_train_minutes=predict_minutes(train + setup, cfg.gpu_tflops, cfg.utilization),
        gpu_eval_minutes=predict_minutes(evaluation, cfg.gpu_tflops, cfg.utilization),
        gpu_peak_gb=predict_memory_gb(m["frozen"], m["trainable"], m["saved"], m["optimizer_slots"]),
        reported=REPORTED.get(name, "not reported"), notes=notes)


def machine_info(threads: int) -> JSONObject:
    model = platform.processor() or platform.machine()
    try:
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        model = found.group(1).strip() if found else model
    except OSError:
        pass
    return {"cpu": model, "cpu_count": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
            "platform": platform.platform(), "load_average": list(os.getloadavg())}


def default_tree(spec: TreeSpec) -> Path:
    return cache_root() / f"scale-tree-{spec.classes}x{spec.shots}x{spec.eval_per_class}"


def run_scale(cfg: ScaleConfig, log: Callable[[str], None] = print) -> JSONObject:
    """Build or reuse the tree, open the session, probe the encoders and the evaluation path, measure every method."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    retain_freed_memory()  # as the Trainer does on CPU
    started = time.perf_counter()
    load_start = list(os.getloadavg())
    spec = TreeSpec(classes=cfg.classes, shots=cfg.shots, eval_per_class=cfg.eval_per_class,
                    size=tuple(cfg.image_size))
    tree, built = ensure_tree(cfg.tree or default_tree(spec), spec, log)
    tree_seconds = time.perf_counter() - started
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ImageNet's shared class names ('crane', 'maillot') warn once per listing
        session = open_session(DataConfig(data_root=str(tree)),
                               BackboneConfig(model=cfg.model, pretrained="none", precision="fp32"),
                               RuntimeConfig(device="cpu", workers=0, cache=False, decoded_cache=False,
                                             threads=cfg.threads))
    split = session.draw_split(cfg.shots, cfg.seed, val_shots=0)
    bench = Bench(cfg, session, list(split.train), log=log)
    log(f"{len(session.classes)} classes, {len(bench.train)} train images; probing the encoders")
    encoders = probe_encoders(bench)
    encoders["train_loader"] = probe_loader(bench)
    evaluation = evaluation_path(bench)
    log(f"evaluation path: {evaluation['images']} images in {evaluation['seconds']:.1f} s; "
        + ", ".join(f"{k} {v['classes']} classes" for k, v in evaluation["sets"].items()))
    rows = []
    for name in cfg.methods or scale_methods():
        log(f"measuring {name}")
        rows.append(measure(bench, name))
        log(measured_line(rows[-1]))
    return {"config": {**asdict(cfg), "out": str(cfg.out), "tree": str(tree)},
            "machine": {**machine_info(torch.get_num_threads()), "load_average_at_start": load_start},
            "tree": {"root": str(tree), "built": built, "seconds": tree_seconds, **asdict(spec)},
            "gpu": {"name": cfg.gpu, "peak_tflops": cfg.gpu_tflops, "utilization": cfg.utilization},
            "protocol": {"train_images": len(bench.train), "classes": len(session.classes), "val_shots": VAL_SHOTS,
                         "test_images": TEST_IMAGES},
            "encoders": encoders, "evaluation_path": evaluation, "rows": [asdict(row) for row in rows],
            "also_reported": GALLOP, "wall_seconds": time.perf_counter() - started}


def _num(value: float, digits: int = 1) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:,.{digits}f}"


def measured_line(row: ScaleRow) -> str:
    """The progress line of one measured method; what is unknown (FLOPs torch cannot count) is "–" as in
    scale.md, and a method without training steps (zero-shot) has no per-step numbers."""
    predicted = f"predicted {_num(row.gpu_train_minutes)} GPU min"
    if row.protocol_steps == 0:
        return f"  no training steps ({row.measured_shape}); {predicted}"
    return (f"  {_num(row.cpu_seconds_per_step, 2)} s/step at the reference shape ({row.measured_shape}); "
            f"{_num(row.flops_per_step / 1e12, 3)} TFLOP/step; {predicted}")


def format_scale_table(results: JSONObject) -> str:
    """scale.md: the setting, one row per method, the notes."""
    gpu, machine, cfg = results["gpu"], results["machine"], results["config"]
    lines = [
        f"# Scale rehearsal: {results['protocol']['classes']} classes, {results['protocol']['train_images']:,} train "
        f"images, {cfg['model']} (random init)",
        "",
        f"{'quick' if cfg['quick'] else 'full'} mode; {machine['cpu']}, {machine['torch_threads']} torch threads of "
        f"{machine['cpu_count']} CPUs, torch {machine['torch']}; load average at start "
        f"{machine['load_average_at_start'][0]:.2f}, at the end {machine['load_average'][0]:.2f}; wall "
        f"{results['wall_seconds'] / 60:.1f} min (tree {results['tree']['seconds']:.0f} s, "
        f"{'built' if results['tree']['built'] else 'reused'}). GPU prediction: {gpu['name']}, "
        f"{gpu['peak_tflops']:g} TFLOP/s x {gpu['utilization']:g} utilization.",
        "",
        "| method | protocol steps | TFLOP / step | CPU s / step | predicted GPU min (train) | GPU min (eval) "
        "| predicted peak GPU GB | saved for backward GB / step | peak RSS GB | examples / s (measured) "
        "| text passes / step | cache GB | loader CPU-core min | measured shape | reported |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['label']} | {row['protocol_steps']:,} | {_num(row['flops_per_step'] / 1e12, 3)} | "
            f"{_num(row['cpu_seconds_per_step'], 2)} | {_num(row['gpu_train_minutes'])} | "
            f"{_num(row['gpu_eval_minutes'])} | {_num(row['gpu_peak_gb'], 2)} | "
            f"{_num(row['saved_bytes_per_step'] / 1e9, 2)} | {_num(row['peak_rss_bytes'] / GIB, 2)} | "
            f"{_num(row['measured_examples_per_second'], 2)} | {row['text_passes_per_step']:,} | "
            f"{_num(row['cache_bytes'] / 1e9, 2)} | {_num(row['loader_cpu_minutes'], 0)} | {row['measured_shape']} | "
            f"{row['reported']} |")
    enc, ev = results["encoders"], results["evaluation_path"]
    lines += ["", f"Frozen encoders: {enc['image_gflops']:.1f} GFLOP per image, {enc['text_gflops_per_prompt']:.2f} "
              f"GFLOP per prompt ({enc['text_seconds_per_prompt']:.3f} CPU s per prompt); train loader "
              f"{enc['train_loader']['seconds_per_image']:.3f} s per JPEG (decode + augmentation); evaluation path: "
              f"{ev['images']} images in {ev['seconds']:.1f} s ({ev['seconds_per_image']:.3f} s per image, decode "
              "included); sets: " + ", ".join(
                  f"{k} {v['classes']} classes{'' if v['labels_inside_subset'] else ' (LABELS OUTSIDE ITS SUBSET)'}"
                  for k, v in ev["sets"].items()) + ".", "", results["also_reported"], ""]
    for row in results["rows"]:
        lines.append(f"- {row['label']}: {row['reference_shape']}; extrapolation {row['extrapolation']}; "
                     + "; ".join(row["notes"]))
    return "\n".join(lines) + "\n"


def write_results(results: JSONObject, out: Path) -> tuple[Path, Path]:
    """scale.json and scale.md in `out`, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    return write_json(out / "scale.json", results), write_text(out / "scale.md", format_scale_table(results))


def parse_args(argv: Optional[Sequence[str]] = None) -> ScaleConfig:
    defaults = ScaleConfig()
    parser = argparse.ArgumentParser(prog="scripts/benchmark.py scale", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small measured shapes, 1 timed step (<= 20 min)")
    parser.add_argument("--out", type=Path, default=defaults.out, help="folder for scale.json and scale.md (new)")
    parser.add_argument("--tree", type=Path, default=None, help="where the synthetic tree is (built when absent)")
    parser.add_argument("--model", default=defaults.model, help="open_clip model name or model-config JSON")
    parser.add_argument("--classes", type=int, default=defaults.classes, help="classes of the tree (1,000: ImageNet)")
    parser.add_argument("--shots", type=int, default=defaults.shots)
    parser.add_argument("--eval-per-class", type=int, default=defaults.eval_per_class)
    parser.add_argument("--methods", nargs="+", default=(), help="default: every Table-2 method, CLIP-LoRA, "
                                                                  "every adapter kind")
    parser.add_argument("--batch", type=int, default=defaults.batch, help="images per measured step")
    parser.add_argument("--text-chunk", type=int, default=defaults.text_chunk, help="classes per measured step")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="timed steps after the probe step")
    parser.add_argument("--eval-images", type=int, default=defaults.eval_images, help="images per evaluation set")
    parser.add_argument("--gpu-tflops", type=float, default=defaults.gpu_tflops)
    parser.add_argument("--utilization", type=float, default=defaults.utilization)
    runtime_fields = add_runtime_args(parser)
    args = parser.parse_args(argv)
    runtime = runtime_from(args, runtime_fields, parser)
    apply_runtime(runtime)
    options = {k: v for k, v in vars(args).items() if k not in runtime_fields}
    out = options["out"]
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is not a folder: give a new folder for scale.json and scale.md")
    if (out / "scale.json").exists():
        parser.error(f"--out {out} already holds scale.json (finished results are kept): give a new folder")
    try:
        return ScaleConfig(**{**options, "methods": tuple(options["methods"])}, threads=runtime.threads)
    except ValueError as err:
        parser.error(str(err))


def main(argv: Optional[Sequence[str]] = None) -> JSONObject:
    """Parse flags, run, write scale.json and scale.md, print the table."""
    cfg = parse_args(argv)
    results = run_scale(cfg)
    paths = write_results(results, cfg.out)
    print(format_scale_table(results))
    print(f"wrote {paths[0]} and {paths[1]}")
    return results
