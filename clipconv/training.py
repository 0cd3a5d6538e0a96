"""Training loop for image-encoder methods: AdamW, cosine schedule, autocast, per-epoch checkpoints, resume.

Determinism: every epoch reseeds torch from (seed, epoch) and shuffles with a generator seeded the
same way, so a run resumed from the checkpoint of epoch e replays epochs e+1… exactly as an
uninterrupted run would (bit-identical on CPU). Under torchrun the model is wrapped in
DistributedDataParallel and each rank trains on its slice of the same global batches
(clipconv.runtime.ranks); see `Trainer._train_epoch_distributed` for how the loss is scaled.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipconv.runtime import ranks
from clipconv.runtime.io import load_torch
from clipconv.runtime.outputs import remove_stale_temps, save_torch
from clipconv.runtime.progress import progress

__all__ = ["TrainConfig", "Trainer", "TrainingDivergedError", "build_optimizer", "build_scheduler", "epoch_seed",
           "resolve_precision", "compile_module", "fused_adamw"]

STATE_FILE = "train_state.pt"
#: torch.compile backend of `TrainConfig.compile` (tests use "aot_eager": same graphs, no C++ compiler)
COMPILE_BACKEND = "inductor"


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; nothing is written past the last good checkpoint."""


@dataclass
class TrainConfig:
    """Optimization settings. Defaults are the paper's Convpass_CLIP protocol (Table 3)."""

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
    #: learning-rate multipliers by parameter-name prefix, e.g. (("head.", 0.1),): one AdamW param group each
    lr_scales: tuple[tuple[str, float], ...] = ()
    #: L2-SP weight a: the loss adds a/2·||θ − θ₀||² over the trainable tensors, θ₀ = their values when the
    #: Trainer is built (Li, Grandvalet & Davoudi, ICML 2018); 0 = plain cross-entropy
    l2sp: float = 0.0
    #: torch.compile the model for the training forward/backward (the saved tensors stay the uncompiled model's)
    compile: bool = False

    def to_dict(self) -> dict[str, Any]:
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


def fused_adamw(params: Sequence[torch.Tensor]) -> Optional[bool]:
    """True (torch's fused AdamW kernel) when every parameter is a floating-point CUDA tensor; else None,
    torch's default (foreach on CPU)."""
    return True if params and all(p.is_cuda and p.is_floating_point() for p in params) else None


def compile_module(module: nn.Module, backend: Optional[str] = None) -> Callable[..., Any]:
    """`torch.compile(module)` with `COMPILE_BACKEND` (or `backend`); parameters stay shared with `module`."""
    return torch.compile(module, backend=backend or COMPILE_BACKEND)


def build_optimizer(params: Sequence[nn.Parameter], cfg: TrainConfig,
                    names: Optional[Sequence[str]] = None) -> torch.optim.Optimizer:
    """AdamW over `params`; with `cfg.lr_scales` (and the parameters' `names`) one param group per prefix
    with lr = cfg.lr · multiplier, the rest in a group at cfg.lr (first matching prefix wins)."""
    if not cfg.lr_scales:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused_adamw(params))
    if names is None or len(names) != len(params):
        raise ValueError("lr_scales needs the parameter names")
    groups: dict[float, list[nn.Parameter]] = {}
    for name, param in zip(names, params):
        scale = next((float(m) for prefix, m in cfg.lr_scales if name.startswith(prefix)), 1.0)
        groups.setdefault(scale, []).append(param)
    return torch.optim.AdamW([{"params": group, "lr": cfg.lr * scale} for scale, group in groups.items()],
                             lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused_adamw(params))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Per-iteration cosine decay to 0 after an optional linear warm-up."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(total - 1, int(round(cfg.warmup_epochs * steps_per_epoch))) if cfg.warmup_epochs > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _normal(value: Any) -> Any:
    """Lists and tuples compare alike (a saved state may hold either)."""
    return tuple(_normal(v) for v in value) if isinstance(value, (list, tuple)) else value


class Trainer:
    """Trains the parameters of `model` that require grad with cross-entropy on (images, labels) — plus the
    L2-SP penalty toward their values at construction when `cfg.l2sp` > 0 (the logged "loss" is then the
    whole objective) — with AdamW, one param group per `cfg.lr_scales` prefix.

    `make_loader(generator)` returns an iterable of (images, labels) batches shuffled with `generator`.
    `validate()` (optional) returns a validation accuracy; the best epoch's trainable tensors are kept.
    """

    def __init__(
        self,
        model: nn.Module,
        make_loader: Callable[[torch.Generator], Any],
        steps_per_epoch: int,
        cfg: TrainConfig,
        device: torch.device,
        run_dir: Optional[Path] = None,
        validate: Optional[Callable[[], float]] = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.model = model
        self.make_loader = make_loader
        self.cfg = cfg
        self.device = device
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.validate = validate
        self.log = log
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        if cfg.l2sp < 0:
            raise ValueError(f"l2sp must be >= 0, got {cfg.l2sp}")
        self.optimizer = build_optimizer(self.params, cfg, [n for n, _ in named])
        # L2-SP anchor: the trainable tensors as given (before any resume load), i.e. the starting point θ₀
        self.anchor = [p.detach().clone() for p in self.params] if cfg.l2sp > 0 else None
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        self.precision = resolve_precision(cfg.precision, device)
        self.scaler = torch.amp.GradScaler("cuda") if (self.precision == "fp16" and device.type == "cuda") else None
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best: Optional[dict[str, Any]] = None
        # under torchrun: DistributedDataParallel over the trainable parameters (the model itself otherwise)
        ranks.check_batch_size(cfg.batch_size)
        self.forward_model = ranks.wrap_model(model, device)
        self._image_shape: Optional[tuple[int, ...]] = None

    # ----- state -------------------------------------------------------------------------------
    def _trainable(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def _load_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if param.requires_grad:
                    param.copy_(tensors[name].to(param.device, param.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "trainable": self._trainable(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "history": self.history,
            "best": self.best,
            "config": self.cfg.to_dict(),
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
                   if k not in ("workers", "eval_every", "compile") and _normal(saved.get(k, defaults[k])) != _normal(v)}
        if changed:
            raise ValueError(f"cannot resume from '{path}': training settings differ (saved, now): {changed}")
        self._load_trainable(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.best = state.get("best")

    # ----- loop --------------------------------------------------------------------------------
    def _autocast(self):
        if self.precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def training_forward(self) -> Callable[..., Any]:
        """`self.forward_model` (the model, or its DDP wrapper under torchrun), or with `cfg.compile` its
        torch.compile wrapper (built once per model object)."""
        model = self.forward_model
        if not self.cfg.compile:
            return model
        if getattr(self, "_compiled", (None,))[0] is not model:
            self._compiled = (model, compile_module(model))
        return self._compiled[1]

    def penalty(self) -> torch.Tensor:
        """The L2-SP term a/2·Σ||θ − θ₀||² (0 without `l2sp`)."""
        if self.anchor is None:
            return torch.zeros((), device=self.device)
        total = sum(((p.float() - a.float()) ** 2).sum() for p, a in zip(self.params, self.anchor))
        return 0.5 * self.cfg.l2sp * total

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training objective: cross-entropy, plus the L2-SP penalty when `l2sp` > 0."""
        loss = F.cross_entropy(logits.float(), labels)
        return loss + self.penalty() if self.anchor is not None else loss

    def _step(self, loss: torch.Tensor) -> None:
        """Backward (through the grad scaler with fp16), optimizer step, scheduler step."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.scheduler.step()

    def train_epoch(self) -> dict[str, Any]:

        epoch = self.epoch + 1
        seed = epoch_seed(self.cfg.seed, epoch)
        torch.manual_seed(ranks.rank_seed(seed))  # dropout masks; `seed` itself in one process
        generator = torch.Generator().manual_seed(seed)
        self.model.train()
        if ranks.is_distributed():
            return self._train_epoch_distributed(epoch, generator)
        total_loss, total_seen, correct, step = 0.0, 0, 0, 0
        started = time.perf_counter()
        bar = progress(self.make_loader(generator), total=self.steps_per_epoch, desc=f"epoch {epoch}/{self.cfg.epochs}",
                   unit="batch", leave=False)
        for batch in bar:
            if batch is None:
                continue
            images, labels = batch
            images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            with self._autocast():
                logits = self.training_forward()(images)
            loss = self.loss(logits, labels)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"non-finite loss ({loss.item()}) at epoch {epoch}, step {step + 1}, "
                    f"lr {self.scheduler.get_last_lr()[0]:.3g}; the last good checkpoint is kept — "
                    "lower --lr or --scale, or use --precision fp32"
                )
            self._step(loss)
            step += 1
            total_loss += loss.item() * len(labels)
            total_seen += len(labels)
            correct += int((logits.argmax(dim=1) == labels).sum())
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step == 0:
            raise ValueError(f"epoch {epoch} had no decodable training image; check the data with "
                             "scripts/check_data.py --verify")
        self.epoch = epoch
        record = {
            "epoch": epoch,
            "loss": total_loss / max(1, total_seen),
            "train_top1": 100.0 * correct / max(1, total_seen),
            "lr": self.scheduler.get_last_lr()[0],
            "seconds": round(time.perf_counter() - started, 2),
        }
        return record

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

    def _train_epoch_distributed(self, epoch: int, generator: torch.Generator) -> dict[str, Any]:
        """`train_epoch` under torchrun: this rank's slice of each global batch; its summed cross-entropy
        is scaled by world size / global batch size, so DDP's gradient average is the gradient of the
        global batch's mean loss (the single-process objective), L2-SP added once per rank."""

        world = ranks.world_size()
        sums = torch.zeros(3, dtype=torch.float64)  # loss · images, images, correct (this rank)
        step = 0
        started = time.perf_counter()
        bar = progress(self.make_loader(generator), total=self.steps_per_epoch,
                       desc=f"epoch {epoch}/{self.cfg.epochs}", unit="batch", leave=False)
        for images, labels in bar:
            if len(labels) == 0:
                images, labels = self._padding_batch()
            self._image_shape = tuple(images.shape[1:])
            images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            real = labels != ranks.IGNORE_LABEL
            count = ranks.all_reduce_sum(torch.tensor([float(real.sum())], dtype=torch.float64))
            if count.item() == 0:  # every image of this global batch was undecodable: skipped, as in one process
                continue
            with self._autocast():
                logits = self.training_forward()(images)
            summed = F.cross_entropy(logits.float(), labels, reduction="sum",
                                     ignore_index=ranks.IGNORE_LABEL)
            penalty = self.penalty() if self.anchor is not None else None
            check = ranks.all_reduce_sum(torch.tensor([summed.item()], dtype=torch.float64))
            mean = check.item() / count.item() + (penalty.item() if penalty is not None else 0.0)
            if not math.isfinite(mean):
                raise TrainingDivergedError(
                    f"non-finite loss ({mean}) at epoch {epoch}, step {step + 1}, "
                    f"lr {self.scheduler.get_last_lr()[0]:.3g}; the last good checkpoint is kept — "
                    "lower --lr or --scale, or use --precision fp32"
                )
            loss = summed * (world / count.item())
            if penalty is not None:
                loss = loss + penalty
            self._step(loss)
            step += 1
            seen = int(real.sum())
            sums += torch.tensor([mean * seen, seen, float(((logits.argmax(dim=1) == labels) & real).sum())],
                                 dtype=torch.float64)
            bar.set_postfix(loss=f"{mean:.4f}")
        if step == 0:
            raise ValueError(f"epoch {epoch} had no decodable training image; check the data with "
                             "scripts/check_data.py --verify")
        total_loss, total_seen, correct = ranks.all_reduce_sum(sums).tolist()
        self.epoch = epoch
        return {"epoch": epoch, "loss": total_loss / max(1, total_seen),
                "train_top1": 100.0 * correct / max(1, total_seen), "lr": self.scheduler.get_last_lr()[0],
                "seconds": round(time.perf_counter() - started, 2)}

    def fit(self) -> list[dict[str, Any]]:
        """Train until cfg.epochs (continuing from a loaded state); checkpoint after every epoch."""
        while self.epoch < self.cfg.epochs:
            record = self.train_epoch()
            if self.validate is not None and (record["epoch"] % self.cfg.eval_every == 0
                                              or record["epoch"] == self.cfg.epochs):
                self.model.eval()
                record["val_top1"] = float(self.validate())
                if self.best is None or record["val_top1"] > self.best["val_top1"]:
                    self.best = {"epoch": record["epoch"], "val_top1": record["val_top1"],
                                 "trainable": self._trainable()}
            self.history.append(record)
            val = f" val top-1 {record['val_top1']:.2f}%" if "val_top1" in record else ""
            self.log(f"epoch {record['epoch']}/{self.cfg.epochs}: loss {record['loss']:.4f} "
                     f"train top-1 {record['train_top1']:.2f}% lr {record['lr']:.3g}{val} ({record['seconds']} s)")
            self.save_state()
        self.model.eval()
        return self.history

    def restore_best(self) -> Optional[dict[str, Any]]:
        """Load the best validation epoch's tensors (no-op without validation); return its record."""
        if self.best is None:
            return None
        self._load_trainable(self.best["trainable"])
        return {"epoch": self.best["epoch"], "val_top1": self.best["val_top1"]}
