"""Loader benchmark: today's image path vs the new one (draft decoding, decoded K-shot cache), as ratios.

    OMP_NUM_THREADS=1 python scripts/benchmark.py loaders --images 256 --source 500x375 --epochs 3

On generated JPEGs (default 500×375, ImageNet's typical size) it times, in one run with the two paths
interleaved (A B, B A, ...):
  * the evaluation loader (CLIP's Resize + CenterCrop transform): full decode vs `draft` decoding;
  * a validation pass after the first (a training run validates every epoch): the files again vs the
    images cached after the transform's Resize (exact);
  * the training loader (RandomResizedCrop + flip): every epoch decoding every JPEG vs the decoded
    cache (epoch 1 includes decoding and writing the cache entry; later epochs read memory).
and reports median images/s and the median over repeats of each repeat's today/new time ratio. `--check-source` also measures what drafting changes on
larger JPEGs, where it applies: the mean and max absolute difference of the transformed pixels (0–255);
`--zero-shot-check 192` how the shipped mini CLIP's zero-shot predictions change (`draft_zero_shot_check`).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torchvision import transforms as T

from clipconv.app.bench import report
from clipconv.app.cli.common import plain_warnings
from clipconv.app.cli.options import add_runtime_args, apply_runtime, runtime_from
from clipconv.backbone import protocol_train_transform
from clipconv.data.decoded import decoded_images, wait_for_writes
from clipconv.data.demo_world import WORLD_CLASSES, image_rng, render
from clipconv.data.draft import draft_for, leading_resize, needed_short_side
from clipconv.data.folder import ImageListDataset
from clipconv.evaluation import image_loader
from clipconv.head import class_embeddings
from clipconv.mini_clip import demo_backbone
from clipconv.runtime.jsontypes import JSONObject

__all__ = ["LoaderBenchConfig", "write_jpegs", "model_transforms", "run_loader_benchmark", "draft_difference",
           "draft_zero_shot_check",
           "format_loader_table", "main"]


@dataclass
class LoaderBenchConfig:
    """What to benchmark; every field is a flag of `scripts/benchmark.py loaders`."""

    images: int = 256
    source: str = "500x375"
    size: int = 224
    epochs: int = 3
    batch: int = 32
    workers: int = 0
    repeats: int = 5
    check_source: Optional[str] = "1000x750"
    check_images: int = 32
    zero_shot_check: int = 0  # image size of the mini-CLIP zero-shot check of drafting (0: skip)
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.images < 1 or self.epochs < 2 or self.repeats < 1 or self.batch < 1 or self.workers < 0
                or self.zero_shot_check < 0):
            raise ValueError("the loaders benchmark needs --images >= 1, --epochs >= 2, --repeats >= 1, --batch >= 1, "
                             "--workers >= 0 and --zero-shot-check >= 0")
        _wh(self.source)
        if self.check_source:
            _wh(self.check_source)


def _wh(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"image size must look like 500x375, got {text!r}") from None
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {text!r}")
    return width, height


def write_jpegs(folder: Path, count: int, size: tuple[int, int], seed: int = 0, classes: int = 2,
                quality: int = 90) -> list[tuple[str, int]]:
    """Write `count` photo-like JPEGs (smooth colour fields, edges and sensor-like noise) of `size`
    (width, height) as `folder/c<k>/<i>.jpg`; return the (relative path, label) samples."""

    rng = np.random.default_rng(seed)
    width, height = size
    samples = []
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for index in range(count):
        label = index % classes
        coarse = rng.random((max(2, height // 32), max(2, width // 32), 3)).astype(np.float32) * 255
        field = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BICUBIC),
                           dtype=np.float32)
        cx, cy, radius = rng.random() * width, rng.random() * height, (0.1 + 0.3 * rng.random()) * min(size)
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < radius ** 2
        field[disc] = 0.5 * field[disc] + 0.5 * rng.random(3).astype(np.float32) * 255
        field += rng.normal(0, 8, field.shape).astype(np.float32)
        rel = f"c{label}/{index:05d}.jpg"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(field.clip(0, 255).astype(np.uint8)).save(folder / rel, "JPEG", quality=quality)
        samples.append((rel, label))
    return samples


def model_transforms(size: int):
    """(train, eval) transforms of a CLIP model with input `size`: the protocol's RandomResizedCrop(0.08–1)
    + flip, and open_clip's Resize + CenterCrop, with OpenAI's normalization."""


    cfg = PreprocessCfg(size=size)
    return protocol_train_transform(cfg), image_transform_v2(cfg, is_train=False)


def _drain(loader) -> int:
    seen = 0
    for images, labels in loader:
        seen += len(labels)
    return seen


def _eval_pass(root, samples, transform, cfg, draft_size, decoded=None) -> float:

    start = time.perf_counter()
    seen = _drain(image_loader(root, samples, transform, cfg.batch, cfg.workers, draft_size=draft_size,
                               decoded=decoded))
    assert seen == len(samples)
    return time.perf_counter() - start


def _train_epochs(root, samples, transform, cfg, cached: bool, cache_dir: Path) -> list[float]:
    """Seconds of each epoch; with `cached`, epoch 1 includes decoding (and writing the disk entry)."""


    wait_for_writes()
    shutil.rmtree(cache_dir, ignore_errors=True)  # every repeat builds the cache afresh
    seconds, decoded = [], None
    for epoch in range(cfg.epochs):
        start = time.perf_counter()
        if cached and decoded is None:
            decoded = decoded_images(root, samples, needed_short_side(transform), cache_dir=cache_dir,
                                     workers=cfg.workers)
        generator = torch.Generator().manual_seed(cfg.seed + epoch)
        torch.manual_seed(cfg.seed + epoch)
        seen = _drain(image_loader(root, samples, transform, cfg.batch, cfg.workers, shuffle=True,
                                   generator=generator, decoded=decoded))
        assert seen == len(samples)
        seconds.append(time.perf_counter() - start)
    return seconds


def draft_difference(root: Path, samples: Sequence, transform, draft_size: Optional[int]) -> dict[str, float]:
    """What drafting changes after `transform` (a PIL → tensor transform without normalization is best):
    mean and max absolute difference of the outputs ×255 between drafted and full decoding."""

    full = ImageListDataset(root, samples, transform)
    drafted = ImageListDataset(root, samples, transform, draft_size=draft_size)
    diffs = [((full[i][0] - drafted[i][0]).abs() * 255).flatten() for i in range(len(samples))]
    every = torch.cat(diffs)
    return {"mean_abs": float(every.mean()), "max_abs": float(every.max()),
            "p99_abs": float(every.kthvalue(max(1, int(0.99 * every.numel()))).values)}


@torch.no_grad()
def draft_zero_shot_check(image_size: int = 192, per_class: int = 8, seed: int = 0,
                          workdir: Optional[Path] = None) -> JSONObject:
    """What drafting changes in a pretrained model's predictions: the demo world's source-domain images
    rendered at `image_size` px (JPEG, quality 90), scored zero-shot by the shipped mini CLIP (48 px, so
    192 px images decode at 1/4 scale) with full and with drafted decoding: top-1 of each, how often the
    two argmaxes agree, and the largest logit difference relative to the largest |logit|."""

    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="clipconv-draft-check.")) if own else Path(workdir)
    try:
        samples = []
        for cls in WORLD_CLASSES:
            for index in range(per_class):
                rel = f"{cls.id}/{index:03d}.jpg"
                (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
                render(cls.index, "source", image_rng(seed, "source", cls.index, index), image_size).save(
                    workdir / rel, "JPEG", quality=90)
                samples.append((rel, cls.index))
        backbone = demo_backbone("cpu")
        text = class_embeddings(backbone.model, backbone.tokenizer, [c.name for c in WORLD_CLASSES],
                                ["a photo of a {}."])
        draft_size = draft_for("eval", backbone.eval_transform, training=False)
        logits = {}
        for name, size in (("full", None), ("draft", draft_size)):
            dataset = ImageListDataset(workdir, samples, backbone.eval_transform, draft_size=size)
            images = torch.stack([dataset[i][0] for i in range(len(samples))])
            feats = backbone.model.encode_image(images)
            logits[name] = 100.0 * torch.nn.functional.normalize(feats, dim=-1) @ text.T
        labels = torch.tensor([label for _, label in samples])
        top1 = {k: float((v.argmax(1) == labels).float().mean() * 100) for k, v in logits.items()}
        return {"images": len(samples), "image_size": image_size, "draft_size": draft_size,
                "decoded_size": list(ImageListDataset(workdir, samples[:1], None, draft_size=draft_size)[0][0].size),
                "top1_full": top1["full"], "top1_draft": top1["draft"],
                "argmax_agreement": float((logits["full"].argmax(1) == logits["draft"].argmax(1)).float().mean() * 100),
                "max_logit_diff_rel": float((logits["full"] - logits["draft"]).abs().max() / logits["full"].abs().max())}
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


def run_loader_benchmark(cfg: LoaderBenchConfig, workdir: Optional[Path] = None) -> JSONObject:
    """Run the interleaved comparison; returns the settings, per-path seconds and the ratios."""

    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="clipconv-loaders.")) if own else Path(workdir)
    try:
        root = workdir / "images"
        samples = write_jpegs(root, cfg.images, _wh(cfg.source), cfg.seed)
        train_t, eval_t = model_transforms(cfg.size)
        eval_draft = draft_for("eval", eval_t, training=False)
        evals = {"today": [], "new": []}
        trains = {"today": [], "new": []}
        repeated = {"today": [], "new": []}

        decoded_val = decoded_images(root, samples, eval_draft, workers=cfg.workers, prepare=leading_resize(eval_t))
        for round_index in range(cfg.repeats):
            order = ("today", "new") if round_index % 2 == 0 else ("new", "today")
            for path in order:
                evals[path].append(_eval_pass(root, samples, eval_t, cfg, eval_draft if path == "new" else None))
            for path in order:  # a validation pass after the first (per-epoch validation of a training run)
                repeated[path].append(_eval_pass(root, samples, eval_t, cfg, None,
                                                 decoded_val if path == "new" else None))
            for path in order:
                trains[path].append(_train_epochs(root, samples, train_t, cfg, path == "new", workdir / "cache"))
        n = len(samples)
        seconds = {  # per repeat: seconds of a pass over the n images
            "eval": evals, "eval_repeated": repeated,
            "train_epoch1": {p: [r[0] for r in v] for p, v in trains.items()},
            "train_later": {p: [float(np.mean(r[1:])) for r in v] for p, v in trains.items()},
        }
        # medians over repeats; the ratio is the median of each repeat's today/new time (the two paths of a
        # repeat ran back to back, so load from other processes changes both alike)
        rate = {k: {p: n / statistics.median(v[p]) for p in v} for k, v in seconds.items()}
        ratios = {k: statistics.median(t / w for t, w in zip(v["today"], v["new"])) for k, v in seconds.items()}
        result: JSONObject = {
            "config": asdict(cfg),
            "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "platform": platform.platform(), "load_avg": list(os.getloadavg())},
            "draft_size_eval": eval_draft, "needed_short_side_train": needed_short_side(train_t),
            "seconds": {"eval": evals, "eval_repeated": repeated, "train": trains},
            "images_per_s": rate,
            "ratios": ratios,
        }
        if cfg.check_source:

            check_root = workdir / "check"
            check = write_jpegs(check_root, cfg.check_images, _wh(cfg.check_source), cfg.seed + 1)
            unnormalized = T.Compose([t for t in eval_t.transforms if not isinstance(t, T.Normalize)])
            result["draft_check"] = {"source": cfg.check_source, "images": len(check), "draft_size": eval_draft,
                                     **draft_difference(check_root, check, unnormalized, eval_draft)}
        if cfg.zero_shot_check:
            result["draft_zero_shot"] = draft_zero_shot_check(cfg.zero_shot_check, seed=cfg.seed,
                                                              workdir=workdir / "zero-shot")
        return result
    finally:

        wait_for_writes()
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


def format_loader_table(result: JSONObject) -> str:
    cfg = result["config"]
    lines = [f"loaders on {cfg['images']} generated {cfg['source']} JPEGs -> {cfg['size']} px, batch {cfg['batch']}, "
             f"workers {cfg['workers']}, {cfg['epochs']} epochs, medians of {cfg['repeats']} interleaved repeats",
             f"{'loader':<22}{'today img/s':>12}{'new img/s':>12}{'ratio':>8}"]
    names = {"eval": "evaluation", "eval_repeated": "validation, pass 2+", "train_epoch1": "training, epoch 1",
             "train_later": "training, epochs 2+"}
    for key, label in names.items():
        rate = result["images_per_s"][key]
        lines.append(f"{label:<22}{rate['today']:>12.1f}{rate['new']:>12.1f}{result['ratios'][key]:>7.2f}x")
    check = result.get("draft_check")
    if check:
        lines.append(f"draft on {check['images']} {check['source']} JPEGs (eval transform, 0-255 units): mean |diff| "
                     f"{check['mean_abs']:.2f}, p99 {check['p99_abs']:.1f}, max {check['max_abs']:.1f}")
    zs = result.get("draft_zero_shot")
    if zs:
        lines.append(f"draft on {zs['images']} demo images of {zs['image_size']} px -> decoded {zs['decoded_size']}, mini "
                     f"CLIP zero-shot: top-1 {zs['top1_full']:.2f}% full vs {zs['top1_draft']:.2f}% drafted, argmax "
                     f"agreement {zs['argmax_agreement']:.1f}%, max |logit diff| {100 * zs['max_logit_diff_rel']:.1f}% "
                     "of max |logit|")
    lines.append(f"load average {result['machine']['load_avg']}")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[LoaderBenchConfig, Optional[str]]:
    defaults = LoaderBenchConfig()
    parser = argparse.ArgumentParser(prog="scripts/benchmark.py loaders", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=defaults.images, help="generated JPEGs")
    parser.add_argument("--source", default=defaults.source, help="their size WxH (default 500x375)")
    parser.add_argument("--size", type=int, default=defaults.size, help="model input size")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="training epochs per repeat (>= 2)")
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--workers", type=int, default=defaults.workers, help="DataLoader worker processes")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="interleaved repeats (medians kept)")
    parser.add_argument("--check-source", default=defaults.check_source,
                        help="size of the JPEGs on which to measure what drafting changes ('' to skip)")
    parser.add_argument("--check-images", type=int, default=defaults.check_images)
    parser.add_argument("--zero-shot-check", type=int, default=defaults.zero_shot_check, metavar="PX",
                        help="also score demo-world images rendered at PX px with the mini CLIP, full vs drafted "
                             "decoding (e.g. 192: 1/4 scale; 0: skip)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", help="also write the results as JSON here")
    runtime_fields = add_runtime_args(parser)
    args = parser.parse_args(argv)
    apply_runtime(runtime_from(args, runtime_fields, parser))
    for name in runtime_fields:
        vars(args).pop(name, None)
    out = args.out
    del args.out
    try:
        cfg = LoaderBenchConfig(**vars(args))
    except ValueError as err:
        parser.error(str(err))
    return cfg, out


def main(argv: Optional[Sequence[str]] = None) -> JSONObject:
    """Parse flags, run, print the table and write JSON (`--out`)."""
    plain_warnings()
    cfg, out = parse_args(argv)
    return report(run_loader_benchmark(cfg), format_loader_table, out)
