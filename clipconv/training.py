"""The one training loop of every trained method: a `Trainer` runs a `TrainingTask`.

A task (one per trained method) gives its named trainable tensors, its batches of an epoch and its loss on
a batch (`BatchLoss`: the loss summed over the batch's examples). The Trainer owns the rest, once:
optimizer and learning-rate schedule (`TrainConfig`), autocast (+ a GradScaler for fp16), the backward and
optimizer step, the non-finite loss stop, the per-epoch validation pick, the train state written after every
epoch and the bit-identical resume, and — under torchrun — the DistributedDataParallel wrap.

Determinism: with `seeding="epoch"` every epoch reseeds torch from (seed, epoch) and draws its batch order
from a generator seeded the same way; with `seeding="run"` one generator seeded with `seed` serves the
whole run. Either way the train state holds torch's RNG state and the generator's, so a run resumed from
the state of epoch e replays epochs e+1… exactly as an uninterrupted run would (bit-identical on CPU).

One epoch loop serves one process and torchrun. Each rank gets its slice of every global batch
(clipconv.data.sharded); the trainer counts the global batch's examples (an all-reduce; the count itself in
one process) and back-propagates `total · world size / count` (+ the task's penalty), so DDP's gradient
average is the gradient of the global batch's mean loss — in one process exactly the mean loss.
"""
from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Generic, Iterable, Literal, NamedTuple, Optional, Sequence, TypedDict, TypeVar, Union

import torch
import torch.nn.functional as F
from torch import nn

from clipconv.head import ImageClassifier
from clipconv.runtime import ranks
from clipconv.runtime.ahead import LoadAhead
from clipconv.runtime.cpus import usable_cores
from clipconv.runtime.io import load_torch
from clipconv.runtime.memory import retain_freed_memory
from clipconv.runtime.outputs import remove_stale_temps, save_torch
from clipconv.runtime.progress import progress

__all__ = ["TrainConfig", "Trainer", "TrainingTask", "BatchLoss", "ClassifierTask", "TrainingDivergedError",
           "build_optimizer", "build_scheduler", "epoch_seed", "warmup_cosine_lr", "resolve_precision",
           "compile_module", "fused_adamw", "STATE_FILE", "Forward", "Record", "ImageBatch",
           "AnchoredClassifierTask", "Averager", "make_averager", "weight_average_problem", "GPA_MEAN", "GPA_STD",
           "Anchors", "check_anchor_weights", "mean_over_ranks"]

STATE_FILE = "train_state.pt"
#: torch.compile backend of `TrainConfig.compile` (tests use "aot_eager": same graphs, no C++ compiler)
COMPILE_BACKEND = "inductor"
#: the schedules of `TrainConfig.schedule`
SCHEDULES = ("cosine", "cosine_annealing", "epoch_warmup_cosine", "one_cycle")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; nothing is written past the last good checkpoint."""


@dataclass
class TrainConfig:
    """Optimization settings. Defaults are the paper's Convpass_CLIP protocol (Table 3); each method sets
    its reference's optimizer and schedule."""

    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    precision: str = "fp32"
    grad_checkpointing: bool = False
    seed: int = 1
    workers: int = 0
    eval_every: int = 1
    #: learning-rate multipliers by parameter-name prefix, e.g. (("head.", 0.1),): one param group each
    lr_scales: tuple[tuple[str, float], ...] = ()
    #: L2-SP weight a: the loss adds a/2·||θ − θ₀||² over the trainable tensors, θ₀ = their values when the
    #: task is built (Li, Grandvalet & Davoudi, ICML 2018); 0 = plain cross-entropy (`ClassifierTask`)
    l2sp: float = 0.0
    #: torch.compile the model for the training forward/backward (the saved tensors stay the uncompiled model's)
    compile: bool = False
    optimizer: Literal["adamw", "sgd"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    eps: float = 1e-8  # AdamW
    momentum: float = 0.9  # SGD
    #: AdamW's fused kernel when every parameter is a floating-point CUDA tensor (else torch's default)
    fused: bool = True
    #: cosine: per step, linear warm-up of `warmup_epochs` then cosine to 0 (LambdaLR);
    #: cosine_annealing: per step, torch's CosineAnnealingLR over all steps down to `min_lr`;
    #: epoch_warmup_cosine: per epoch, Dassl's constant warm-up at `warmup_lr` then cosine (`warmup_cosine_lr`);
    #: one_cycle: per step, torch's OneCycleLR (cosine up over `warmup_fraction` of the steps, then down)
    schedule: str = "cosine"
    min_lr: float = 0.0
    warmup_fraction: float = 0.0
    warmup_lr: float = 1e-5
    warmup_recount: bool = True
    #: total optimizer steps (an epoch is one pass over the task's batches, the last one cut short);
    #: None: `epochs` whole epochs
    steps: Optional[int] = None
    #: epoch: torch and the batch-order generator reseeded from (seed, epoch) every epoch; run: one generator
    #: seeded with `seed` for the whole run, torch's RNG left to the task
    seeding: Literal["epoch", "run"] = "epoch"
    #: weight averaging during training (`make_averager`): "none", "ema:DECAY", "swa:EPOCHS" or "gpa[:MEAN:STD]"
    weight_average: str = "none"
    #: zero-shot anchors of the task (`Anchors`): weights of the logit KL and of the feature L1 (0 = off); recorded
    #: here so that a train state resumes only with the same ones
    anchor_logits: float = 0.0
    anchor_features: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be adamw or sgd, got {self.optimizer!r}")
        if self.seeding not in ("epoch", "run"):
            raise ValueError(f"seeding must be epoch or run, got {self.seeding!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        problem = weight_average_problem(self.weight_average)
        if problem:
            raise ValueError(f"weight_average {problem}")
        check_anchor_weights(self.anchor_logits, self.anchor_features)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' → bf16 on CUDA (fp16 if bf16 is unsupported), fp32 on CPU (bf16 backward is slower there)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7_919) % (2**63 - 1)


def warmup_cosine_lr(epoch: int, base_lr: float, epochs: int, warmup_epochs: int = 1,
                     warmup_lr: float = 1e-5, recount: bool = True) -> float:
    """Learning rate of 0-indexed `epoch` under Dassl's constant warm-up + cosine (CoOp/CoCoOp).

    The first `warmup_epochs` run at `warmup_lr`. With `recount` (Dassl's WARMUP_RECOUNT=True, what the
    CoOp/CoCoOp configs use) the cosine count restarts after the warm-up: epoch e runs at
    base_lr·½(1 + cos(π·(e − warmup_epochs)/epochs)), so the first epoch after warm-up runs at base_lr.
    `recount=False` continues the count instead: base_lr·½(1 + cos(π·e/epochs)).
    """
    if epoch < warmup_epochs:
        return warmup_lr
    position = epoch - warmup_epochs if recount else epoch
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * position / epochs))


def fused_adamw(params: Sequence[torch.Tensor]) -> Optional[bool]:
    """True (torch's fused AdamW kernel) when every parameter is a floating-point CUDA tensor; else None,
    torch's default (foreach on CPU)."""
    return True if params and all(p.is_cuda and p.is_floating_point() for p in params) else None


def compile_module(module: nn.Module, backend: Optional[str] = None) -> Forward:
    """`torch.compile(module)` with `COMPILE_BACKEND` (or `backend`); parameters stay shared with `module`."""
    return torch.compile(module, backend=backend or COMPILE_BACKEND)


#: optimizer param groups: {"params": [parameters], "lr": …, other hyperparameters}
ParamGroups = list[dict[str, Union[list[nn.Parameter], float]]]
#: the training forward: the task's model, its DistributedDataParallel wrapper or its torch.compile wrapper
Forward = Callable[..., torch.Tensor]
#: an epoch record: epoch, step, loss, lr, seconds (+ train_top1, val_top1)
Record = dict[str, float]
#: a task's batch type
B = TypeVar("B")
ImageBatch = tuple[torch.Tensor, torch.Tensor]


class RNGState(TypedDict):
    """The random states a train state saves: torch's CPU RNG, the batch-order generator, CUDA's (if used)."""
    torch: torch.Tensor
    generator: torch.Tensor
    cuda: Optional[list[torch.Tensor]]


class BestEpoch(TypedDict):
    """The best validation epoch so far and its trainable tensors."""
    epoch: float
    val_top1: float
    trainable: dict[str, torch.Tensor]


class TrainState(TypedDict):
    """What `Trainer.state_dict` saves (torch.save) to resume a run."""
    epoch: int
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, object]
    scheduler: dict[str, object]
    scaler: Optional[dict[str, object]]
    rng: RNGState
    task: dict[str, object]
    history: list[Record]
    best: Optional[BestEpoch]
    config: dict[str, object]
    averager: Optional[dict[str, object]]


def build_optimizer(params: Sequence[nn.Parameter], cfg: TrainConfig, names: Optional[Sequence[str]] = None,
                    groups: Optional[ParamGroups] = None) -> torch.optim.Optimizer:
    """`cfg.optimizer` (AdamW or SGD) over `params`: the task's own param `groups` when given; else with
    `cfg.lr_scales` (and the parameters' `names`) one param group per prefix with lr = cfg.lr · multiplier,
    the rest in a group at cfg.lr (first matching prefix wins); else one group."""
    if groups is None and cfg.lr_scales:
        if names is None or len(names) != len(params):
            raise ValueError("lr_scales needs the parameter names")
        by_scale: dict[float, list[nn.Parameter]] = {}
        for name, param in zip(names, params):
            scale = next((float(m) for prefix, m in cfg.lr_scales if name.startswith(prefix)), 1.0)
            by_scale.setdefault(scale, []).append(param)
        groups = [{"params": group, "lr": cfg.lr * scale} for scale, group in by_scale.items()]
    target: Union[Sequence[nn.Parameter], ParamGroups] = params if groups is None else groups
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(target, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    fused = fused_adamw(params) if cfg.fused else None
    if cfg.betas == (0.9, 0.999) and cfg.eps == 1e-8:  # torch's defaults
        return torch.optim.AdamW(target, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.AdamW(target, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=fused)


class EpochLR(torch.optim.lr_scheduler.LRScheduler):
    """lr = `fn(epoch)` exactly (the value itself, not a factor of the base lr); stepped once per epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, fn: Callable[[int], float]) -> None:
        self.fn = fn
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [self.fn(self.last_epoch) for _ in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "fn")}


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
                    ) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule of `cfg.schedule` (see `TrainConfig`); `per_epoch(scheduler)` tells when it steps."""
    total = cfg.steps if cfg.steps is not None else max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "cosine_annealing":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total, eta_min=cfg.min_lr)
    if cfg.schedule == "one_cycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total,
                                                   pct_start=cfg.warmup_fraction, anneal_strategy="cos",
                                                   cycle_momentum=False)
    if cfg.schedule == "epoch_warmup_cosine":
        warmup = int(cfg.warmup_epochs) if float(cfg.warmup_epochs).is_integer() else cfg.warmup_epochs
        return EpochLR(optimizer, lambda epoch: warmup_cosine_lr(epoch, cfg.lr, cfg.epochs, warmup, cfg.warmup_lr,
                                                                 cfg.warmup_recount))
    warmup = min(total - 1, int(round(cfg.warmup_epochs * steps_per_epoch))) if cfg.warmup_epochs > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        position = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, position)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def per_epoch(scheduler: torch.optim.lr_scheduler.LRScheduler) -> bool:
    return isinstance(scheduler, EpochLR)


# ----- weight averaging during training ------------------------------------------------------------------
#: PromptSRC's Gaussian weighted aggregation (GPA) over epochs: its few-shot ImageNet setting (Khattak et al.,
#: ICCV 2023; configs/trainers/PromptSRC/vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml: GPA_MEAN 30, GPA_STD 30)
GPA_MEAN = 30.0
GPA_STD = 30.0
#: the kinds of `TrainConfig.weight_average`
AVERAGES = ("none", "ema", "swa", "gpa")


def _spec_parts(spec: str) -> tuple[str, list[str]]:
    kind, *args = str(spec).strip().lower().split(":")
    return kind, args


def weight_average_problem(spec: object) -> Optional[str]:
    """Why `spec` is not a weight averaging ("none", "ema:DECAY" with DECAY in (0, 1), "swa:EPOCHS" with
    EPOCHS >= 1, "gpa" or "gpa:MEAN:STD" with STD > 0); None when it is one (a config check)."""
    if not isinstance(spec, str):
        return f"must be a string such as 'ema:0.999', got {spec!r}"
    kind, args = _spec_parts(spec)
    try:
        values = [float(a) for a in args]
    except ValueError:
        return f"must be none, ema:DECAY, swa:EPOCHS or gpa[:MEAN:STD] with numbers, got {spec!r}"
    if kind not in AVERAGES or not all(math.isfinite(v) for v in values):
        return f"must be none, ema:DECAY, swa:EPOCHS or gpa[:MEAN:STD], got {spec!r}"
    if kind == "none" and not values:
        return None
    if kind == "ema" and len(values) == 1 and 0 < values[0] < 1:
        return None
    if kind == "swa" and len(values) == 1 and values[0] >= 1 and values[0].is_integer():
        return None
    if kind == "gpa" and (not values or (len(values) == 2 and values[1] > 0)):
        return None
    return {"none": "none takes no argument", "ema": f"ema:DECAY needs one DECAY in (0, 1), got {spec!r}",
            "swa": f"swa:EPOCHS needs one whole number of epochs >= 1, got {spec!r}",
            "gpa": f"gpa takes no argument or MEAN:STD with STD > 0, got {spec!r}"}[kind]


class Averager(ABC):
    """An average of the trainable tensors kept beside training (the Trainer's weight-averaging hook):
    `after_step` is called after every optimizer step, `after_epoch` at the end of every epoch, both with the
    live tensors; `averaged()` is the current average (None before it has any weight)."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.average: Optional[dict[str, torch.Tensor]] = None  # fp32, on the tensors' device

    def after_step(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def after_epoch(self, epoch: int, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def averaged(self) -> Optional[dict[str, torch.Tensor]]:
        return self.average

    @torch.no_grad()
    def _blend(self, tensors: dict[str, torch.Tensor], weight: float) -> None:
        """average ← average + weight · (tensors − average) (the tensors themselves when there is none yet)."""
        if self.average is None:
            self.average = {n: t.detach().float().clone() for n, t in tensors.items()}
            return
        for name, tensor in tensors.items():
            self.average[name].lerp_(tensor.detach().float(), weight)

    def state_dict(self) -> dict[str, object]:
        average = None if self.average is None else {n: t.cpu().clone() for n, t in self.average.items()}
        return {"spec": self.spec, "average": average}

    def load_state_dict(self, state: dict[str, object], device: torch.device) -> None:
        average = state.get("average")
        self.average = None if average is None else {n: t.to(device) for n, t in average.items()}


class EMAAverager(Averager):
    """Exponential moving average, updated after every optimizer step: a ← decay·a + (1 − decay)·θ
    (a starts at the weights after the first step)."""

    def __init__(self, spec: str, decay: float) -> None:
        super().__init__(spec)
        self.decay = decay

    def after_step(self, tensors: dict[str, torch.Tensor]) -> None:
        self._blend(tensors, 1.0 - self.decay)


class SWAAverager(Averager):
    """Stochastic weight averaging (Izmailov et al., UAI 2018): the uniform average of the weights at the ends
    of the last `last` epochs of `epochs` (none before that window starts)."""

    def __init__(self, spec: str, last: int, epochs: int) -> None:
        super().__init__(spec)
        self.first = max(1, epochs - last + 1)
        self.count = 0

    def after_epoch(self, epoch: int, tensors: dict[str, torch.Tensor]) -> None:
        if epoch >= self.first:
            self.count += 1
            self._blend(tensors, 1.0 / self.count)

    def state_dict(self) -> dict[str, object]:
        return {**super().state_dict(), "count": self.count}

    def load_state_dict(self, state: dict[str, object], device: torch.device) -> None:
        super().load_state_dict(state, device)
        self.count = int(state.get("count", 0))


class GPAAverager(Averager):
    """PromptSRC's Gaussian weighted aggregation (Khattak et al., ICCV 2023, trainers/promptsrc.py): epoch e of
    1..`epochs` has weight N(e; mean, std), the weights normalized to sum 1; the average of the epochs so far is
    normalized by their weights' sum (after the last epoch: PromptSRC's aggregate)."""

    def __init__(self, spec: str, epochs: int, mean: float = GPA_MEAN, std: float = GPA_STD) -> None:
        super().__init__(spec)
        gauss = [math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
                 for e in range(1, epochs + 1)]
        total = sum(gauss)
        self.weights = [g / total for g in gauss]
        self.seen = 0.0

    def after_epoch(self, epoch: int, tensors: dict[str, torch.Tensor]) -> None:
        weight = self.weights[min(epoch, len(self.weights)) - 1]
        if weight <= 0:
            return
        self.seen += weight
        self._blend(tensors, weight / self.seen)

    def state_dict(self) -> dict[str, object]:
        return {**super().state_dict(), "seen": self.seen}

    def load_state_dict(self, state: dict[str, object], device: torch.device) -> None:
        super().load_state_dict(state, device)
        self.seen = float(state.get("seen", 0.0))


def make_averager(spec: str, epochs: int) -> Optional[Averager]:
    """The averager of `spec` (see `weight_average_problem`) over a run of `epochs` epochs; None for "none"."""
    problem = weight_average_problem(spec)
    if problem:
        raise ValueError(f"weight_average {problem}")
    kind, args = _spec_parts(spec)
    values = [float(a) for a in args]
    if kind == "ema":
        return EMAAverager(spec, values[0])
    if kind == "swa":
        return SWAAverager(spec, int(values[0]), epochs)
    if kind == "gpa":
        return GPAAverager(spec, epochs, *values)
    return None


# ----- zero-shot anchors (PromptSRC) -----------------------------------------------------------------------
def check_anchor_weights(logits: float, features: float) -> None:
    """Raise ValueError unless both anchor weights are finite and >= 0."""
    for name, weight in (("anchor_logits", logits), ("anchor_features", features)):
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {weight}")


def mean_over_ranks(sums: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] = ranks.all_reduce_sum
                    ) -> list[float]:
    """Means of per-rank weighted sums: `sums` holds [Σ w·x₁, …, Σ w·x_k, Σ w] of this rank; `reduce` sums them
    over the ranks (torchrun's all-reduce; the tensor itself in one process); returns [x̄₁, …, x̄_k], each
    Σ w·x / Σ w over every rank (0 when no rank had any weight). Works on a copy: `sums` is left as it was."""
    total = reduce(sums.detach().double().cpu().clone())
    weight = float(total[-1])
    return [float(v) / weight if weight > 0 else 0.0 for v in total[:-1]]


class Anchors:
    """PromptSRC's self-regularizing anchors toward the frozen zero-shot model (Khattak et al., "Self-regulating
    Prompts", ICCV 2023; reference code trainers/promptsrc.py), shared by the tasks that use them:

    - `logits` W: W · KL(p_zs ‖ p) with p = softmax(logits / T), T = 1 on the logit-scaled logits, in
      PromptSRC's normalization: the KL summed over the batch and the classes, · T², / the logits' element
      count (its `F.kl_div(log_softmax(adapted / T), log_softmax(zero_shot / T), reduction='sum',
      log_target=True) · T·T / numel`);
    - `features` W: W · mean |f − f_zs| over the L2-normalized image features of the same (augmented) batch
      (PromptSRC's `F.l1_loss(..., reduction='mean')`).

    `penalty` also accumulates the unweighted terms, weighted by the batch's rows, for the epoch's record
    (`metrics`: `anchor_logits_kl` / `anchor_features_l1` of the anchors in use, averaged over the examples of
    every rank under torchrun — `mean_over_ranks`)."""

    TEMPERATURE = 1.0

    def __init__(self, logits: float = 0.0, features: float = 0.0) -> None:
        check_anchor_weights(logits, features)
        self.logits, self.features = float(logits), float(features)
        self._sums = torch.zeros(3, dtype=torch.float64)  # KL·rows, L1·rows, rows (this rank)

    @classmethod
    def of(cls, cfg: TrainConfig) -> "Anchors":
        """The anchors a train config records (`TrainConfig.anchor_logits` / `anchor_features`)."""
        return cls(cfg.anchor_logits, cfg.anchor_features)

    @property
    def active(self) -> bool:
        return self.logits > 0 or self.features > 0

    def reset(self) -> None:
        """Start a new epoch's record."""
        self._sums.zero_()

    def penalty(self, logits: torch.Tensor, zs_logits: torch.Tensor, features: torch.Tensor,
                zs_features: torch.Tensor) -> torch.Tensor:
        """W_l · KL + W_f · L1 of one batch (rows = examples; features already L2-normalized)."""
        t = self.TEMPERATURE
        kl = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(zs_logits / t, dim=1), reduction="sum",
                      log_target=True) * t ** 2 / max(1, logits.numel())
        l1 = F.l1_loss(features, zs_features, reduction="sum") / max(1, features.numel())
        rows = float(len(logits))
        self._sums += torch.tensor([float(kl.detach()) * rows, float(l1.detach()) * rows, rows], dtype=torch.float64)
        return self.logits * kl + self.features * l1

    def metrics(self, reduce: Callable[[torch.Tensor], torch.Tensor] = ranks.all_reduce_sum) -> Record:
        """The epoch's mean terms of the anchors in use (`reduce`: the sum over ranks; under torchrun every rank
        must call it, as the trainer does after every epoch)."""
        if not self.active:
            return {}
        kl, l1 = mean_over_ranks(self._sums, reduce)
        record: Record = {}
        if self.logits > 0:
            record["anchor_logits_kl"] = kl
        if self.features > 0:
            record["anchor_features_l1"] = l1
        return record


class BatchLoss(NamedTuple):
    """A task's loss on one batch: `total`, the loss summed over the batch's `TrainingTask.examples` (the
    trainer divides by the global count: the batch mean); `penalty`, a regularizer added once (not divided);
    `correct`, the examples predicted right (train top-1), None when the task has no such notion."""

    total: torch.Tensor
    correct: Optional[int] = None
    penalty: Optional[torch.Tensor] = None


class TrainingTask(ABC, Generic[B]):
    """What a trained method gives the Trainer. Batches are (inputs, labels) pairs unless `examples` is
    overridden; labels equal to `ranks.IGNORE_LABEL` (torchrun padding) are not examples."""

    #: log-line prefix (e.g. "coop")
    name: str = ""
    #: the module switched to train mode for the epochs (eval mode for validation and after training) and, with
    #: `data_parallel`, wrapped in DistributedDataParallel under torchrun and handed to `loss` as `forward`
    model: Optional[nn.Module] = None
    data_parallel: bool = False

    @abstractmethod
    def trainable(self) -> dict[str, nn.Parameter]:
        """The trained tensors by name (optimized, checkpointed, restored from the validation pick)."""

    def param_groups(self) -> Optional[ParamGroups]:
        """Optimizer param groups of the trainable tensors (own weight decay etc.); None: one group (or
        `TrainConfig.lr_scales`)."""
        return None

    @abstractmethod
    def steps_per_epoch(self) -> int:
        """Batches in one epoch (for the schedule and the progress bar)."""

    @abstractmethod
    def batches(self, epoch: int, generator: torch.Generator) -> Iterable[Optional[B]]:
        """The batches of 1-indexed `epoch` in the order drawn with `generator`; None batches are skipped."""

    @abstractmethod
    def loss(self, batch: B, forward: Forward) -> BatchLoss:
        """The loss on `batch` (run under the trainer's autocast); `forward` is `model` as wrapped for training
        (DDP under torchrun, torch.compile with `TrainConfig.compile`), or `model` itself."""

    def examples(self, batch: B) -> int:
        """The examples `BatchLoss.total` sums over: labels other than IGNORE_LABEL."""
        return int((batch[1] != ranks.IGNORE_LABEL).sum())

    def after_step(self) -> None:
        """Called after every optimizer step (e.g. a clamp)."""

    def validate(self) -> Optional[float]:
        """A validation accuracy after an epoch (the best epoch's tensors are kept); None: no validation."""
        return None

    def epoch_metrics(self) -> Record:
        """Extra numbers of the epoch just trained (e.g. mean auxiliary loss terms), added to its record."""
        return {}

    def state_dict(self) -> dict[str, object]:
        """Extra resumable state of the task (e.g. a data stream's position), saved with the train state."""
        return {}

    def load_state_dict(self, state: dict[str, object]) -> None:
        pass


class ClassifierTask(TrainingTask[ImageBatch]):
    """Cross-entropy of `model(images)` on (images, labels) batches from `make_loader(generator)` — plus the
    L2-SP penalty a/2·||θ − θ₀||² toward the trainable tensors as given when `l2sp` > 0. Data-parallel:
    under torchrun a rank whose slice of a global batch is empty feeds DDP one zero image labelled
    IGNORE_LABEL."""

    data_parallel = True

    def __init__(self, model: nn.Module, make_loader: Callable[[torch.Generator], Iterable[Optional[ImageBatch]]],
                 steps_per_epoch: int, l2sp: float = 0.0, validate: Optional[Callable[[], float]] = None,
                 device: Optional[torch.device] = None) -> None:
        if l2sp < 0:
            raise ValueError(f"l2sp must be >= 0, got {l2sp}")
        self.model, self.make_loader, self._steps = model, make_loader, max(1, steps_per_epoch)
        self._validate = validate
        self.named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.l2sp = float(l2sp)
        # L2-SP anchor: the trainable tensors as given (before any resume load), i.e. the starting point θ₀
        self.anchor = [p.detach().clone() for p in self.named.values()] if l2sp > 0 else None
        self.device = device or next(iter(self.named.values()), torch.zeros(())).device
        self._image_shape: Optional[tuple[int, ...]] = None

    def trainable(self) -> dict[str, nn.Parameter]:
        return self.named

    def steps_per_epoch(self) -> int:
        return self._steps

    def batches(self, epoch: int, generator: torch.Generator) -> Iterable[Optional[ImageBatch]]:
        return self.make_loader(generator)

    def penalty(self) -> torch.Tensor:
        """The L2-SP term a/2·Σ||θ − θ₀||² (0 without `l2sp`)."""
        if self.anchor is None:
            return torch.zeros((), device=self.device)
        total = sum(((p.float() - a.float()) ** 2).sum() for p, a in zip(self.named.values(), self.anchor))
        return 0.5 * self.l2sp * total

    def objective(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The mean training objective: cross-entropy, plus the L2-SP penalty when `l2sp` > 0."""
        loss = F.cross_entropy(logits.float(), labels)
        return loss + self.penalty() if self.anchor is not None else loss

    def _padding_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One zero image with IGNORE_LABEL: what a rank left without a decodable image feeds DDP."""
        shape = self._image_shape
        if shape is None:
            size = getattr(getattr(self.model, "visual", None), "image_size", None)
            if size is None:
                raise RuntimeError("a rank got no decodable training image and the input size is unknown")
            size = (size, size) if isinstance(size, int) else tuple(size)
            shape = (3, *size)
        return torch.zeros(1, *shape), torch.full((1,), ranks.IGNORE_LABEL, dtype=torch.long)

    def loss(self, batch: ImageBatch, forward: Forward) -> BatchLoss:
        images, labels = batch
        if len(labels) == 0:
            images, labels = self._padding_batch()
        self._image_shape = tuple(images.shape[1:])
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        logits = forward(images)
        total = F.cross_entropy(logits.float(), labels, reduction="sum", ignore_index=ranks.IGNORE_LABEL)
        real = labels != ranks.IGNORE_LABEL
        correct = int(((logits.argmax(dim=1) == labels) & real).sum())
        return BatchLoss(total, correct, self.penalty() if self.anchor is not None else None)

    def validate(self) -> Optional[float]:
        return None if self._validate is None else float(self._validate())


class AnchoredClassifierTask(ClassifierTask):
    """`ClassifierTask` plus PromptSRC's zero-shot anchors (`Anchors`), added to each training batch's mean loss
    (`BatchLoss.penalty`).

    Zero-shot: `frozen` (the original, untouched image encoder) under no_grad in eval mode; its logits are
    logit_scale · head₀(normalize(f_zs)) with head₀ the model's head as given (the text-initialized head before
    training). The adapted features are caught by a forward hook on `model.visual` during the training forward
    (which may be the DDP wrapper). Padding rows (IGNORE_LABEL) are left out. The epoch record gets the
    unweighted epoch means `anchor_logits_kl` / `anchor_features_l1` of the anchors in use, over every rank's
    examples under torchrun."""

    def __init__(self, model: ImageClassifier, make_loader: Callable[[torch.Generator], Iterable[Optional[ImageBatch]]],
                 steps_per_epoch: int, frozen: nn.Module, anchor_logits: float = 0.0, anchor_features: float = 0.0,
                 l2sp: float = 0.0, validate: Optional[Callable[[], float]] = None,
                 device: Optional[torch.device] = None) -> None:
        self.anchors = Anchors(anchor_logits, anchor_features)
        super().__init__(model, make_loader, steps_per_epoch, l2sp, validate, device)
        self.frozen = frozen
        self.anchor_logits, self.anchor_features = self.anchors.logits, self.anchors.features
        self.head0 = (model.head.weight.detach().clone(), model.head.bias.detach().clone())

    @property
    def active(self) -> bool:
        return self.anchors.active

    def batches(self, epoch: int, generator: torch.Generator) -> Iterable[Optional[ImageBatch]]:
        self.anchors.reset()
        return super().batches(epoch, generator)

    @torch.no_grad()
    def zero_shot(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalized features, logits) of the frozen zero-shot model on `images`."""
        self.frozen.eval()
        dtype = next(self.frozen.parameters()).dtype
        features = F.normalize(self.frozen(images.to(dtype)).float(), dim=-1)
        weight, bias = self.head0
        return features, self.model.logit_scale * F.linear(features, weight.float(), bias.float())

    def loss(self, batch: ImageBatch, forward: Forward) -> BatchLoss:
        if not self.active:
            return super().loss(batch, forward)
        images, labels = batch
        if len(labels) == 0:
            images, labels = self._padding_batch()
        self._image_shape = tuple(images.shape[1:])
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        caught: list[torch.Tensor] = []
        hook = self.model.visual.register_forward_hook(lambda module, inputs, output: caught.append(output))
        try:
            logits = forward(images).float()
        finally:
            hook.remove()
        features = F.normalize(caught[-1].float(), dim=-1)
        total = F.cross_entropy(logits, labels, reduction="sum", ignore_index=ranks.IGNORE_LABEL)
        real = labels != ranks.IGNORE_LABEL
        correct = int(((logits.argmax(dim=1) == labels) & real).sum())
        zs_features, zs_logits = self.zero_shot(images[real])
        penalty = self.penalty() + self.anchors.penalty(logits[real], zs_logits, features[real], zs_features)
        return BatchLoss(total, correct, penalty)

    def epoch_metrics(self) -> Record:
        return self.anchors.metrics(ranks.all_reduce_sum if self.data_parallel else (lambda tensor: tensor))


def _normal(value: object) -> object:
    """Lists and tuples compare alike (a saved state may hold either)."""
    return tuple(_normal(v) for v in value) if isinstance(value, (list, tuple)) else value


#: settings that may change between a run and its resume
_RESUME_FREE = ("workers", "eval_every", "compile")


class Trainer:
    """Trains `task` with `cfg`: see the module docstring. `run_dir`: where the train state goes after every
    epoch (rank 0); `load_state` resumes from it."""

    def __init__(self, task: TrainingTask[B], cfg: TrainConfig, device: torch.device, run_dir: Optional[Path] = None,
                 log: Callable[[str], None] = print) -> None:
        self.task, self.cfg, self.device, self.log = task, cfg, torch.device(device), log
        if self.device.type == "cpu":
            retain_freed_memory()  # every step's activations reuse the last step's pages (clipconv.runtime.memory)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        named = task.trainable()
        self.params = list(named.values())
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = build_optimizer(self.params, cfg, list(named), task.param_groups())
        self.steps_per_epoch = max(1, task.steps_per_epoch())
        self.scheduler = build_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        self.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * self.steps_per_epoch
        self.epochs = cfg.epochs if cfg.steps is None else math.ceil(cfg.steps / self.steps_per_epoch)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.generator = torch.Generator().manual_seed(cfg.seed)  # seeding="run": the whole run's batch order
        self.epoch, self.step = 0, 0
        self.history: list[Record] = []
        self.best: Optional[BestEpoch] = None
        #: weight averaging (`cfg.weight_average`): updated after every step and epoch, validated and kept
        self.averager = make_averager(cfg.weight_average, self.epochs)
        # under torchrun: DistributedDataParallel over the trainable parameters (the model itself otherwise)
        # (a task that is not data-parallel trains whole in every process: no wrapper, no collectives)
        self.forward_model: Optional[Forward] = task.model
        self.sharded = task.data_parallel and ranks.is_distributed()
        if task.data_parallel and task.model is not None:
            ranks.check_batch_size(cfg.batch_size)
            self.forward_model = ranks.wrap_model(task.model, self.device)

    # ----- state -------------------------------------------------------------------------------
    def _trainable(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.task.trainable().items()}

    def _load_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, param in self.task.trainable().items():
                param.copy_(tensors[name].to(param.device, param.dtype))

    def _rng_state(self) -> RNGState:
        return {"torch": torch.get_rng_state(), "generator": self.generator.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}

    def _load_rng_state(self, state: RNGState) -> None:
        torch.set_rng_state(state["torch"])
        self.generator.set_state(state["generator"])
        if state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def state_dict(self) -> TrainState:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "trainable": self._trainable(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": self._rng_state(),
            "task": self.task.state_dict(),
            "history": self.history,
            "best": self.best,
            "config": self.cfg.to_dict(),
            "averager": self.averager.state_dict() if self.averager is not None else None,
        }

    def save_state(self) -> None:
        if self.run_dir is not None and ranks.is_main():
            save_torch(self.run_dir / STATE_FILE, self.state_dict())

    def load_state(self, path: Path) -> None:
        remove_stale_temps(path)  # a run killed while saving leaves its temp file beside the last good state
        state = load_torch(path)
        saved, current = state.get("config", {}), self.cfg.to_dict()
        defaults = TrainConfig().to_dict()  # states saved before an option existed ran at its default
        changed = {k: (saved.get(k, defaults[k]), v) for k, v in current.items()
                   if k not in _RESUME_FREE and _normal(saved.get(k, defaults[k])) != _normal(v)}
        if changed:
            raise ValueError(f"cannot resume from '{path}': training settings differ (saved, now): {changed}")
        self._load_trainable(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if state.get("rng"):
            self._load_rng_state(state["rng"])
        self.task.load_state_dict(state.get("task") or {})
        self.epoch = int(state["epoch"])
        self.step = int(state.get("step", self.epoch * self.steps_per_epoch))
        self.history = list(state["history"])
        self.best = state.get("best")
        if self.averager is not None and state.get("averager"):
            self.averager.load_state_dict(state["averager"], self.params[0].device)

    def resume_if_saved(self, resume: bool) -> bool:
        """With `resume`, load the train state in `run_dir` when there is one; True when loaded."""
        path = self.run_dir / STATE_FILE if self.run_dir is not None else None
        if resume and path is not None and ranks.is_main():
            remove_stale_temps(path)  # also when a kill during the first save left no state yet
        if not resume or path is None or not path.is_file():
            return False
        self.load_state(path)
        self.log(f"resumed from {path} after epoch {self.epoch}")
        return True

    # ----- loop --------------------------------------------------------------------------------
    def _autocast(self):
        if self.precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def training_forward(self) -> Optional[Forward]:
        """`self.forward_model` (the task's model, or its DDP wrapper under torchrun), or with `cfg.compile`
        its torch.compile wrapper (built once per model object)."""
        model = self.forward_model
        if not self.cfg.compile or model is None:
            return model
        if getattr(self, "_compiled", (None,))[0] is not model:
            self._compiled = (model, compile_module(model))
        return self._compiled[1]

    def _mode(self, training: bool) -> None:
        if self.task.model is not None:
            self.task.model.train(training)

    def _step(self, loss: torch.Tensor) -> None:
        """Backward (through the grad scaler with fp16), optimizer step, per-step scheduler step."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.task.after_step()
        if self.averager is not None:
            self.averager.after_step(self.task.trainable())
        if not per_epoch(self.scheduler):
            self.scheduler.step()

    def _epoch_generator(self, epoch: int) -> torch.Generator:
        if self.cfg.seeding == "run":
            return self.generator
        seed = epoch_seed(self.cfg.seed, epoch)
        torch.manual_seed(ranks.rank_seed(seed))  # dropout masks; `seed` itself in one process
        return torch.Generator().manual_seed(seed)

    def _core_for_loading(self) -> bool:
        """Whether loading the next batch during backward has a core of its own: on a GPU the backward runs there;
        on the CPU only when torch's intra-op threads leave a core free (beside them a third thread would stall
        their barriers)."""
        if self.device.type != "cpu":
            return True
        return torch.get_num_threads() < usable_cores()

    def train_epoch(self) -> Record:
        """One pass over the task's batches (up to `cfg.steps`); the epoch's record."""
        epoch = self.epoch + 1
        generator = self._epoch_generator(epoch)
        self._mode(True)
        world, forward = (ranks.world_size() if self.sharded else 1), self.training_forward()
        reduce = ranks.all_reduce_sum if self.sharded else (lambda tensor: tensor)
        sums = torch.zeros(3, dtype=torch.float64)  # loss · examples, examples, correct (this rank)
        steps, scored = 0, True
        started = time.perf_counter()
        bar = progress(self.task.batches(epoch, generator), total=self.steps_per_epoch,
                       desc=f"epoch {epoch}/{self.epochs}", unit="batch", leave=False)
        # loading ahead is exact only when nothing draws random numbers between a forward and the next batch
        # (gradient checkpointing recomputes forwards, and their RNG state, during backward), and safe only in
        # one process (under torchrun the loader's collectives would run beside DDP's backward all-reduces)
        ahead = not self.cfg.grad_checkpointing and not ranks.is_distributed() and self._core_for_loading()
        batches = LoadAhead(bar)
        try:
            for batch in batches:
                if batch is None:
                    continue
                seen = self.task.examples(batch)
                count = reduce(torch.tensor([float(seen)], dtype=torch.float64)).item()
                if count == 0:  # every example of this (global) batch was undecodable: skipped
                    continue
                with self._autocast():
                    out = self.task.loss(batch, forward)
                loss = out.total * world / count
                if out.penalty is not None:
                    loss = loss + out.penalty  # once per rank: DDP's average keeps it once
                # the global batch's mean objective (an all-reduce under torchrun; the loss itself in one process)
                mean = reduce(loss.detach().double().cpu().view(1)).item() / world
                if not math.isfinite(mean):
                    raise TrainingDivergedError(
                        f"non-finite loss ({mean}) at epoch {epoch}, step {steps + 1}, "
                        f"lr {self.scheduler.get_last_lr()[0]:.3g}; the last good checkpoint is kept — "
                        "lower --lr or --scale, or use --precision fp32"
                    )
                if ahead and self.step + 1 < self.total_steps:
                    batches.fetch()  # the next batch loads while this one runs backward (runtime/ahead.py)
                self._step(loss)
                steps += 1
                self.step += 1
                scored = scored and out.correct is not None
                sums += torch.tensor([mean * seen, seen, float(out.correct or 0)], dtype=torch.float64)
                bar.set_postfix(loss=f"{mean:.4f}")
                if self.step == self.total_steps:
                    break
        finally:
            batches.close()
        if steps == 0:
            raise ValueError(f"epoch {epoch} had no decodable training image; check the data with "
                             "scripts/check_data.py --verify")
        total_loss, total_seen, correct = reduce(sums).tolist()
        self.epoch = epoch
        record: Record = {"epoch": epoch, "step": self.step, "loss": total_loss / max(1, total_seen)}
        if scored:
            record["train_top1"] = 100.0 * correct / max(1, total_seen)
        record["lr"] = self.scheduler.get_last_lr()[0]
        record["seconds"] = round(time.perf_counter() - started, 2)
        if per_epoch(self.scheduler):
            self.scheduler.step()
        return record

    def fit(self) -> list[Record]:
        """Train until the last epoch (continuing from a loaded state), validating every `cfg.eval_every`
        epochs and after the last, and saving the train state after every epoch.

        With weight averaging (`cfg.weight_average`) the per-epoch validation scores the AVERAGED tensors (the
        live ones while there is no average yet, e.g. before SWA's window) and the validation pick keeps those;
        after the last epoch the model holds the average (what is evaluated and saved)."""
        while self.epoch < self.epochs:
            record = self.train_epoch()
            record.update(self.task.epoch_metrics())
            if self.averager is not None:
                self.averager.after_epoch(record["epoch"], self.task.trainable())
            if record["epoch"] % self.cfg.eval_every == 0 or record["epoch"] == self.epochs:
                self._mode(False)
                score, tensors = self._validate()
                if score is not None:
                    record["val_top1"] = float(score)
                    if self.best is None or record["val_top1"] > self.best["val_top1"]:
                        self.best = {"epoch": record["epoch"], "val_top1": record["val_top1"],
                                     "trainable": tensors if tensors is not None else self._trainable()}
            self.history.append(record)
            self.log(self._line(record))
            self.save_state()
        averaged = self.averager.averaged() if self.averager is not None else None
        if averaged is not None:
            self._load_trainable(averaged)
        self._mode(False)
        return self.history

    def _validate(self) -> tuple[Optional[float], Optional[dict[str, torch.Tensor]]]:
        """The task's validation score of the averaged tensors and those tensors (CPU copies), the live tensors
        back in place afterwards; without an average the score of the live tensors and None."""
        averaged = self.averager.averaged() if self.averager is not None else None
        if averaged is None:
            return self.task.validate(), None
        live = self._trainable()
        self._load_trainable(averaged)
        try:
            score = self.task.validate()
            return score, (self._trainable() if score is not None else {})
        finally:
            self._load_trainable(live)

    def _line(self, record: Record) -> str:
        parts = [f"loss {record['loss']:.4f}"]
        if "train_top1" in record:
            parts.append(f"train top-1 {record['train_top1']:.2f}%")
        parts.append(f"lr {record['lr']:.3g}")
        if "val_top1" in record:
            parts.append(f"val top-1 {record['val_top1']:.2f}%")
        prefix = f"{self.task.name} " if self.task.name else ""
        steps = f" (step {record['step']}/{self.total_steps})" if self.cfg.steps is not None else ""
        return f"{prefix}epoch {record['epoch']}/{self.epochs}{steps}: {' '.join(parts)} ({record['seconds']} s)"

    def restore_best(self) -> Optional[Record]:
        """Load the best validation epoch's tensors (no-op without validation); return its record."""
        if self.best is None:
            return None
        self._load_trainable(self.best["trainable"])
        return {"epoch": self.best["epoch"], "val_top1": self.best["val_top1"]}

    # ----- the classifier task's trainer (adapter tuning) ----------------------------------------------
    @classmethod
    def classifier(cls, model: nn.Module, make_loader: Callable[[torch.Generator], Iterable[Optional[ImageBatch]]],
                   steps_per_epoch: int, cfg: TrainConfig, device: torch.device, run_dir: Optional[Path] = None,
                   validate: Optional[Callable[[], float]] = None, log: Callable[[str], None] = print) -> "Trainer":
        """A Trainer of `ClassifierTask(model, make_loader, steps_per_epoch, cfg.l2sp, validate)`: the
        parameters of `model` that require grad, cross-entropy on (images, labels) batches."""
        task = ClassifierTask(model, make_loader, steps_per_epoch, cfg.l2sp, validate, torch.device(device))
        return cls(task, cfg, device, run_dir, log)
