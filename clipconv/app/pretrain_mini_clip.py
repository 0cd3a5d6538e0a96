"""Contrastive pretraining of the miniature CLIP on procedural image–caption pairs, and its zero-shot check.

The "web data" are objects of the miniature world in three styles (photos, drawings, cartoons) with
varied captions ("a sketch of a striped star"). Images come from a seed stream disjoint from the
benchmark trees, so no test image is ever seen in pretraining.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file

from clipconv.app.cli.common import plain_warnings
from clipconv.app.cli.options import add_runtime_args, apply_runtime, runtime_from
from clipconv.backbone import Backbone, load_backbone
from clipconv.data.demo_world import DOMAINS, WORLD_CLASSES, ensure_world, read_manifest, render
from clipconv.mini_clip import MINI_CLIP_CONFIG, MINI_CLIP_WEIGHTS
from clipconv.runtime.outputs import atomic_path, write_json
from clipconv.training import BatchLoss, Forward, TrainConfig, Trainer, TrainingTask

__all__ = [
    "PretrainConfig", "CAPTION_TEMPLATES", "caption", "render_pretrain_batch", "pretrain",
    "save_checkpoint", "zero_shot_accuracy", "ContrastiveTask", "train_config", "resolve_output", "DEFAULT_OUTPUT", "main",
]

DEFAULT_OUTPUT = Path("mini_clip_pretrain") / "mini_clip.safetensors"  # relative to the working directory

log = logging.getLogger(__name__)

_PRETRAIN_STREAM = 0x7072657472  # "pretr": disjoint from the benchmark world's stream
CAPTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "photo": ("a photo of a {}.", "a photo of the {}.", "a picture of a {}.", "an image of a {}.", "a {}.",
              "{}", "a close-up photo of a {}.", "a photo of a small {}.", "a photo of a big {}.",
              "a blurry photo of a {}."),
    "drawing": ("a sketch of a {}.", "a drawing of a {}.", "a pencil sketch of a {}.",
                "a black and white drawing of a {}.", "a sketch of the {}.", "a line drawing of a {}."),
    "cartoon": ("a cartoon of a {}.", "a cartoon {}.", "an illustration of a {}.", "a rendering of a {}.",
                "a painting of a {}.", "a colorful cartoon of a {}."),
}


@dataclass
class PretrainConfig:
    """Everything that determines the shipped checkpoint (recorded in its metadata)."""

    seed: int = 0
    steps: int = 1500
    batch_size: int = 128
    pool_size: int = 8192  # pre-rendered pairs, reused with fresh captions and flips
    fresh_per_step: int = 32  # newly rendered pairs in every batch
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    style_weights: dict[str, float] = field(default_factory=lambda: {"photo": 0.6, "drawing": 0.2, "cartoon": 0.2})
    render_size: int = 64  # rendered like the benchmark images, then resized to the model's input
    threads: int = 1  # on a shared 2-core machine one thread was ~3× faster than two (less spin-waiting)


def caption(class_index: int, style: str, rng: np.random.Generator) -> str:
    """A varied caption of one pretraining image."""
    templates = CAPTION_TEMPLATES[style]
    return templates[int(rng.integers(len(templates)))].format(WORLD_CLASSES[class_index].name)


def _to_model_input(image: Image.Image, size: int) -> np.ndarray:
    """JPEG round trip + bicubic resize, as the benchmark images go through (HWC uint8 → CHW)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    buffer.seek(0)
    image = Image.open(buffer).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image).transpose(2, 0, 1)


def render_pretrain_batch(seed: int, start: int, count: int, config: PretrainConfig,
                          image_size: int) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Pretraining samples `start … start+count-1` of the stream: uint8 images, class indices, styles."""
    styles = list(config.style_weights)
    weights = np.array([config.style_weights[s] for s in styles], dtype=np.float64)
    weights /= weights.sum()
    images = np.empty((count, 3, image_size, image_size), dtype=np.uint8)
    classes = np.empty(count, dtype=np.int64)
    chosen: list[str] = []
    for k in range(count):
        rng = np.random.default_rng([_PRETRAIN_STREAM, seed, start + k])
        style = styles[int(rng.choice(len(styles), p=weights))]
        classes[k] = int(rng.integers(len(WORLD_CLASSES)))
        image = render(int(classes[k]), style, rng, config.render_size)
        images[k] = _to_model_input(image, image_size)
        chosen.append(style)
    return torch.from_numpy(images), classes, chosen


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's convention: no weight decay on gains, biases and the logit scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        skip = param.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _Normalizer:
    """uint8 CHW images → the model's normalized float input (its own mean/std)."""

    def __init__(self, model: torch.nn.Module):

        cfg = open_clip.get_model_preprocess_cfg(model)
        self.mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255 - self.mean) / self.std


def pretrain(backbone: Backbone, config: PretrainConfig, log_every: int = 50, state_dir: Optional[Path] = None,
             resume: bool = False) -> dict:
    """Train `backbone.model` in place with the CLIP loss; return a summary (losses, wall time).

    The data stream, captions and batches follow `config.seed`; the initialization is the given model's
    (load_backbone's random init uses a fixed seed, so the whole recipe is deterministic). Every `log_every`
    steps (an "epoch" of clipconv.training.Trainer) a line is logged and, with `state_dir`, the train state
    is saved there; `resume` continues from it bit-identically.
    """
    torch.manual_seed(config.seed)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    # Near initialization (small warm-up learning rates) the backward pass produces denormal floats, which
    # made steps ~10× slower on this CPU. Flush-to-zero is per thread: it reaches the OpenMP workers only
    # when set before their pool exists (as main() does); here it covers at least the calling thread.
    torch.set_flush_denormal(True)
    try:
        return _train(backbone, config, log_every, state_dir, resume)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(previous_threads)


def train_config(config: PretrainConfig) -> TrainConfig:
    """open_clip's recipe: AdamW (betas 0.9/0.98, eps 1e-6), one-cycle cosine schedule with warm-up, per step."""
    return TrainConfig(steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                       weight_decay=config.weight_decay, betas=(0.9, 0.98), eps=1e-6, fused=False,
                       schedule="one_cycle", warmup_fraction=config.warmup_fraction, seed=config.seed, seeding="run")


class ContrastiveTask(TrainingTask[tuple[torch.Tensor, torch.Tensor]]):
    """The CLIP loss on a stream of image–caption batches: each batch takes `batch_size - fresh_per_step`
    pairs of a pre-rendered pool (with fresh captions and flips) and `fresh_per_step` newly rendered ones.
    The stream's position (its numpy generator, the next fresh index) and the per-step losses are the
    task's resumable state; the logit scale is clamped to [0, ln 100] after every step."""

    name = "pretrain"

    def __init__(self, backbone: Backbone, config: PretrainConfig, chunk: int) -> None:
        self.model = backbone.model.float()
        self.config, self.tokenizer, self.chunk = config, backbone.tokenizer, max(1, chunk)
        size = backbone.visual.image_size
        self.size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.normalize = _Normalizer(self.model)
        self.texts: dict[str, torch.Tensor] = {}
        self.loss_fn = open_clip.ClipLoss()
        started = time.time()
        self.pool, self.pool_classes, self.pool_styles = render_pretrain_batch(
            config.seed, 0, config.pool_size, config, self.size)
        self.pool_seconds = time.time() - started
        log.info("rendered a pool of %d pairs in %.1f s", config.pool_size, self.pool_seconds)
        self.rng = np.random.default_rng([_PRETRAIN_STREAM, config.seed, 2**32 - 1])  # batches, captions, flips
        self.next_fresh = config.pool_size
        self.losses: list[float] = []

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.model.named_parameters())

    def param_groups(self) -> list[dict]:
        return _param_groups(self.model, self.config.weight_decay)

    def steps_per_epoch(self) -> int:
        return self.chunk

    def _tokens(self, captions: Sequence[str]) -> torch.Tensor:
        missing = [c for c in set(captions) if c not in self.texts]
        if missing:
            for text, row in zip(missing, self.tokenizer(missing)):
                self.texts[text] = row
        return torch.stack([self.texts[c] for c in captions])

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        config, rng = self.config, self.rng
        picks = rng.integers(config.pool_size, size=config.batch_size - config.fresh_per_step)
        fresh, fresh_classes, fresh_styles = render_pretrain_batch(
            config.seed, self.next_fresh, config.fresh_per_step, config, self.size)
        self.next_fresh += config.fresh_per_step
        images = torch.cat([self.pool[torch.from_numpy(picks)], fresh])
        classes = np.concatenate([self.pool_classes[picks], fresh_classes])
        styles = [self.pool_styles[i] for i in picks] + fresh_styles
        flips = torch.from_numpy(rng.random(len(images)) < 0.5)
        images[flips] = images[flips].flip(-1)
        captions = [caption(int(c), s, rng) for c, s in zip(classes, styles)]
        return self.normalize(images), self._tokens(captions)

    def batches(self, epoch: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(min(self.chunk, self.config.steps - (epoch - 1) * self.chunk)):
            yield self._batch()

    def examples(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return 1  # the CLIP loss is the batch's objective itself (not a sum over examples)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor], forward: Forward) -> BatchLoss:
        image_features, text_features, logit_scale = forward(*batch)[:3]
        loss = self.loss_fn(image_features, text_features, logit_scale)
        self.losses.append(float(loss.detach()))
        return BatchLoss(loss)

    def after_step(self) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))

    def state_dict(self) -> dict[str, object]:
        return {"rng": self.rng.bit_generator.state, "next_fresh": self.next_fresh, "losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.rng.bit_generator.state = state["rng"]
            self.next_fresh, self.losses = int(state["next_fresh"]), list(state["losses"])


def _train(backbone: Backbone, config: PretrainConfig, log_every: int, state_dir: Optional[Path],
           resume: bool) -> dict:
    started = time.time()
    task = ContrastiveTask(backbone, config, log_every or config.steps)
    trainer = Trainer(task, train_config(config), torch.device("cpu"), state_dir,
                      log=log.info if log_every else (lambda _: None))
    trainer.resume_if_saved(resume)
    trainer.fit()
    return {"wall_seconds": round(time.time() - started, 1), "pool_seconds": round(task.pool_seconds, 1),
            "final_loss": round(float(np.mean(task.losses[-20:])), 4), "first_loss": round(task.losses[0], 4)}


def save_checkpoint(model: torch.nn.Module, path: Union[str, Path], metadata: Optional[dict] = None) -> Path:
    """Write the model's state dict as fp16 safetensors, atomically (temp file + os.replace)."""


    path = Path(path)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:  # readable like any new file (umask), no temp file left on failure
        save_file(state, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    return path


def resolve_output(output: Optional[Union[str, Path]], overwrite: bool = False) -> Path:
    """Where pretraining writes its weights: `output`, else ./mini_clip_pretrain/mini_clip.safetensors.

    The shipped checkpoint is never the default target; an existing file is replaced only with
    `overwrite=True` (ValueError otherwise, before any training).
    """
    path = Path(output) if output else DEFAULT_OUTPUT
    if path.is_dir():
        raise ValueError(f"--output {path}: is a folder; give a .safetensors file path")
    if path.exists() and not overwrite:
        raise ValueError(f"--output {path}: the file exists; pass --overwrite to replace it, or choose another path")
    return path


def _domain_files(root: Path, name: str) -> list[tuple[Path, int]]:
    domain = DOMAINS[name]
    files: list[tuple[Path, int]] = []
    for index in domain.classes:
        folder = root / domain.directory / (str(index) if domain.numeric_folders else WORLD_CLASSES[index].id)
        files += [(p, index) for p in sorted(folder.glob("*.jpg"))]
    return files


def _load(backbone: Backbone, path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return backbone.eval_transform(image.convert("RGB"))


@torch.no_grad()
def zero_shot_accuracy(backbone: Backbone, world_root: Union[str, Path], template: str = "a photo of a {}.",
                       domains: Optional[Sequence[str]] = None, batch_size: int = 256) -> dict[str, float]:
    """Top-1 (%) per domain of a generated world: cosine similarity to one prompt per class, argmax.

    Domains with a class subset (rendition, adversarial) are scored over their own classes only.
    """
    root = Path(world_root)
    if read_manifest(root) is None:
        raise FileNotFoundError(f"'{root}' is not a finished demo world (no manifest); run generate_world first")
    model = backbone.model.eval()
    device = next(model.parameters()).device
    prompts = backbone.tokenizer([template.format(c.name) for c in WORLD_CLASSES]).to(device)
    text = torch.nn.functional.normalize(model.encode_text(prompts).float(), dim=-1)
    results: dict[str, float] = {}
    for name in domains or list(DOMAINS):
        subset = torch.tensor(DOMAINS[name].classes)
        files = _domain_files(root, name)
        if not files:
            raise FileNotFoundError(f"no images for domain '{name}' under '{root / DOMAINS[name].directory}'")
        correct = 0
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            batch = torch.stack([_load(backbone, p) for p, _ in chunk]).to(device)
            features = torch.nn.functional.normalize(model.encode_image(batch).float(), dim=-1)
            predicted = subset[(features @ text[subset].T).argmax(dim=1).cpu()]
            correct += int((predicted == torch.tensor([label for _, label in chunk])).sum())
        results[name] = round(100.0 * correct / len(files), 2)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: pretrain the miniature CLIP, save it, measure zero-shot on a benchmark world."""
    plain_warnings()
    defaults = PretrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(MINI_CLIP_CONFIG), help="open_clip model-config JSON")
    parser.add_argument("--output", "--out", dest="out", default=None,
                        help=f"output .safetensors (fp16); default ./{DEFAULT_OUTPUT}. The shipped "
                             f"{MINI_CLIP_WEIGHTS.name} is replaced only if named here, with --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--pool-size", type=int, default=defaults.pool_size)
    parser.add_argument("--fresh-per-step", type=int, default=defaults.fresh_per_step)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    runtime_fields = add_runtime_args(parser)
    parser.add_argument("--eval-world", default=None, help="benchmark world root (default: the cache)")
    parser.add_argument("--eval-seed", type=int, default=0, help="seed of the benchmark world for zero-shot")
    parser.add_argument("--report", default=None, help="also write the summary JSON here")
    parser.add_argument("--train-state", default=None,
                        help="folder for the train state, saved every 50 steps; run again with the same folder "
                             "and --resume to continue bit-identically")
    parser.add_argument("--resume", action="store_true", help="continue from the train state in --train-state")
    args = parser.parse_args(argv)
    # Before any torch op creates the OpenMP pool: worker threads inherit the flush-to-zero mode.
    torch.set_flush_denormal(True)
    runtime = runtime_from(args, runtime_fields, parser, defaults={"threads": defaults.threads})
    for name in ("steps", "batch_size", "pool_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 1")
    if not 0 <= args.fresh_per_step <= args.batch_size:
        parser.error("--fresh-per-step must be between 0 and --batch-size")
    try:
        args.out = str(resolve_output(args.out, args.overwrite))
    except ValueError as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    apply_runtime(runtime)

    config = PretrainConfig(seed=args.seed, steps=args.steps, batch_size=args.batch_size, pool_size=args.pool_size,
                            fresh_per_step=args.fresh_per_step, lr=args.lr, threads=runtime.threads)
    backbone = load_backbone(args.config, pretrained=None, device="cpu")  # its random init is fixed-seeded
    if args.resume and not args.train_state:
        parser.error("--resume needs --train-state")
    summary = pretrain(backbone, config, state_dir=Path(args.train_state) if args.train_state else None,
                       resume=args.resume)
    save_checkpoint(backbone.model, args.out, metadata={"pretrain_config": json.dumps(asdict(config))})
    world = ensure_world(args.eval_world, seed=args.eval_seed)
    reloaded = load_backbone(args.config, pretrained=args.out, device="cpu")
    summary.update(config=asdict(config), weights=args.out, eval_world=str(world),
                   zero_shot=zero_shot_accuracy(reloaded, world), chance={
                       n: round(100.0 / len(d.classes), 2) for n, d in DOMAINS.items()},
                   logit_scale=round(reloaded.logit_scale, 3), load_average=os.getloadavg())
    print(json.dumps(summary, indent=1))
    if args.report:
        write_json(args.report, summary)
    return 0
