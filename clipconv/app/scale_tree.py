"""An ImageNet-shaped synthetic tree for the scale rehearsal (`scripts/benchmark.py scale`).

The real class universe (the 1,000 wnids and CLIP class names of prompts/, the 200 wnids of -A and -R from
datasets/), K JPEGs of 500×375 per class for the training split, and a few images per class of every
evaluation set in its on-disk layout: val and -Sketch in wnid folders, -V2 in numeric folders 0..999 (the
universe index), -A/-R in wnid folders of their 200-class subsets (CoOp layout, `clipconv.data.synthetic.LAYOUTS`).
Images are cheap procedural content (a class-coloured field upsampled from a few random pixels); only their
shapes and sizes matter here. The tree is written into a temporary sibling folder and renamed when complete;
`scale_tree.json` records what was built and how many files, and a tree is reused only when it matches.
"""
from __future__ import annotations

import colorsys
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from clipconv.data.synthetic import LAYOUTS
from clipconv.prompts import DATASETS_DIR, imagenet_classes
from clipconv.runtime.io import read_json_object
from clipconv.runtime.outputs import write_json

__all__ = ["TreeSpec", "MANIFEST", "subset_wnids", "build_tree", "tree_problem", "ensure_tree", "expected_files"]

MANIFEST = "scale_tree.json"
#: the tree format; bump when the layout or the content changes
VERSION = 1
EXTENSIONS = {"train": "JPEG", "val": "JPEG", "v2": "jpeg", "sketch": "JPEG", "a": "jpg", "r": "jpg"}


@dataclass(frozen=True)
class TreeSpec:
    """What a tree holds: the first `classes` classes of the universe (1,000: all of ImageNet), `shots` train
    images per class, `eval_per_class` images per class of each evaluation set, images of `size` (w, h)."""

    classes: int = 1000
    shots: int = 16
    eval_per_class: int = 2
    size: tuple[int, int] = (500, 375)
    quality: int = 85
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.classes <= 1000 or self.shots < 1 or self.eval_per_class < 1 or min(self.size) < 1:
            raise ValueError(f"tree: need 1 <= classes <= 1000, shots >= 1, eval_per_class >= 1 and a positive size, "
                             f"got {self}")


def subset_wnids(name: str) -> list[str]:
    """The 200 wnids of ImageNet-A (`a`) or -R (`r`), as shipped in datasets/."""
    return (DATASETS_DIR / f"imagenet_{name}_wnids.txt").read_text().split()


def _plan(spec: TreeSpec) -> list[tuple[str, str, int, int]]:
    """(split, folder, class index, image count) of every class folder of the tree."""
    wnids = [wnid for wnid, _ in imagenet_classes()][:spec.classes]
    subsets = {"a": set(subset_wnids("a")), "r": set(subset_wnids("r"))}
    plan = []
    for index, wnid in enumerate(wnids):
        plan.append(("train", wnid, index, spec.shots))
        plan.append(("val", wnid, index, spec.eval_per_class))
        plan.append(("v2", str(index), index, spec.eval_per_class))  # -V2: folder k = universe class k
        plan.append(("sketch", wnid, index, spec.eval_per_class))
        for name, members in subsets.items():
            if wnid in members:
                plan.append((name, wnid, index, spec.eval_per_class))
    return plan


def expected_files(spec: TreeSpec) -> int:
    """Images the tree holds."""
    return sum(count for *_, count in _plan(spec))


def _image(rng: np.random.Generator, index: int, classes: int, size: tuple[int, int]) -> Image.Image:
    r, g, b = colorsys.hsv_to_rgb(index / classes, 0.8, 0.9)
    coarse = rng.normal(0, 40, (6, 8, 3)) + np.array([r, g, b]) * 255
    return Image.fromarray(coarse.clip(0, 255).astype(np.uint8)).resize(size, Image.BILINEAR)


def build_tree(root: Path, spec: TreeSpec) -> Path:
    """Write the tree of `spec` at `root` (which must not exist) and its manifest; return `root`."""
    root = Path(root)
    work = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    paths = {split: work / rel for split, rel in LAYOUTS["coop"].items()}
    rng = np.random.default_rng(spec.seed)
    files = 0
    for split, folder, index, count in _plan(spec):
        target = paths[split] / folder
        target.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            _image(rng, index, spec.classes, spec.size).save(target / f"{split}_{folder}_{i}.{EXTENSIONS[split]}",
                                                             "JPEG", quality=spec.quality)
            files += 1
    for name in ("a", "r"):
        paths[name].mkdir(parents=True, exist_ok=True)
        (paths[name] / "README.txt").write_text(f"Synthetic ImageNet-{name.upper()} (clipconv scale rehearsal).\n")
    write_json(work / MANIFEST, {"version": VERSION, "spec": asdict(spec), "files": files})
    work.rename(root)
    return root


def _count_images(root: Path) -> int:
    total = 0
    for rel in LAYOUTS["coop"].values():
        base = root / rel
        if base.is_dir():
            total += sum(len([n for n in os.listdir(d.path) if not n.startswith(".")])
                         for d in os.scandir(base) if d.is_dir())
    return total


def tree_problem(root: Path, spec: TreeSpec) -> Optional[str]:
    """None when `root` holds a complete tree of `spec`; else what is wrong with it."""
    manifest = Path(root) / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing"
    try:
        saved = read_json_object(manifest)
    except ValueError as err:
        return str(err)
    wanted = {"version": VERSION, "spec": asdict(spec), "files": expected_files(spec)}
    saved_spec = saved.get("spec")
    if isinstance(saved_spec, dict) and isinstance(saved_spec.get("size"), list):
        saved = {**saved, "spec": {**saved_spec, "size": tuple(saved_spec["size"])}}
    if {k: saved.get(k) for k in wanted} != wanted:
        return f"{manifest} describes another tree ({ {k: saved.get(k) for k in wanted} }, wanted {wanted})"
    found = _count_images(Path(root))
    if found != wanted["files"]:
        return f"{root} holds {found} images, its manifest says {wanted['files']}"
    return None


def ensure_tree(root: Path, spec: TreeSpec, log=print) -> tuple[Path, bool]:
    """(root, built): the tree of `spec` at `root`, reused when verified, else (re)built. A folder there that is
    not such a tree is replaced only when it holds our manifest (an older or damaged rehearsal tree)."""
    root = Path(root)
    problem = tree_problem(root, spec) if root.exists() else "absent"
    if problem is None:
        return root, False
    if root.exists():
        if not (root / MANIFEST).is_file() and any(root.iterdir()):
            raise ValueError(f"--tree {root}: the folder exists and is not a scale-rehearsal tree; give an empty "
                             "or new folder")
        log(f"rebuilding the synthetic tree at {root}: {problem}")
        shutil.rmtree(root)
    log(f"building the synthetic ImageNet-shaped tree at {root} ({expected_files(spec):,} JPEGs of "
        f"{spec.size[0]}x{spec.size[1]})")
    return build_tree(root, spec), True


def class_names(count: int) -> Sequence[str]:
    """The CLIP names of the first `count` ImageNet classes."""
    return [name for _, name in imagenet_classes()][:count]
