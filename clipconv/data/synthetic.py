"""Small generated ImageNet-family trees in the real on-disk layouts (for tests and demos).

Each class has its own colour (hue spread over the classes) and shape (one of five, cycling),
so a tiny model can learn it; position, size and noise vary per image. The variants imitate their
domain shift: -Sketch draws grey outlines, -R flat cartoon colours, -A heavy clutter. Everything is
deterministic from `seed`.
"""
from __future__ import annotations

import colorsys
import random
from pathlib import Path
from typing import Optional, Sequence, Union

from PIL import Image, ImageDraw

from clipconv.prompts import imagenet_classes

__all__ = ["LAYOUTS", "DEFAULT_WNIDS", "make_image_tree", "make_class_folders", "render_class_image"]

# Where each split goes in the CoOp layout and in the raw layouts the authors ship.
LAYOUTS: dict[str, dict[str, str]] = {
    "coop": {
        "train": "imagenet/images/train",
        "val": "imagenet/images/val",
        "v2": "imagenetv2/imagenetv2-matched-frequency-format-val",
        "sketch": "imagenet-sketch/images",
        "a": "imagenet-adversarial/imagenet-a",
        "r": "imagenet-rendition/imagenet-r",
    },
    "raw": {
        "train": "train",
        "val": "val",
        "v2": "imagenetv2-matched-frequency-format-val",
        "sketch": "sketch",
        "a": "imagenet-a",
        "r": "imagenet-r",
    },
}
VARIANTS = ("v2", "sketch", "a", "r")
DEFAULT_WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361")  # ImageNet classes 0..3
SHAPES = ("square", "circle", "triangle", "diamond", "hexagon")
STYLES = {"train": "photo", "val": "photo", "v2": "photo", "sketch": "sketch", "a": "clutter", "r": "cartoon"}


def _class_colour(index: int, count: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(index / max(count, 1), 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def render_class_image(index: int, count: int, style: str, rng: random.Random, size: int = 32) -> Image.Image:
    """One image of class `index` (of `count`) in a style: photo, sketch, clutter or cartoon."""
    colour = _class_colour(index, count)
    if style == "sketch":
        background, fill, outline = (245, 245, 245), None, (60, 60, 60)
    elif style == "cartoon":
        background = tuple(255 - c for c in colour)
        fill, outline = colour, (0, 0, 0)
    else:
        background = tuple(rng.randrange(90, 160) for _ in range(3))
        fill, outline = colour, None
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    if style in ("photo", "clutter"):
        for _ in range(size * (4 if style == "clutter" else 1)):
            x, y = rng.randrange(size), rng.randrange(size)
            draw.point((x, y), fill=tuple(rng.randrange(256) for _ in range(3)))
    extent = rng.uniform(0.45, 0.75) * size
    x0, y0 = rng.uniform(0, size - extent), rng.uniform(0, size - extent)
    box = [x0, y0, x0 + extent, y0 + extent]
    width = max(1, size // 16)
    shape = index % len(SHAPES)
    centre = (x0 + extent / 2, y0 + extent / 2, extent / 2)
    if SHAPES[shape] == "square":
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    elif SHAPES[shape] == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    else:
        sides, rotation = {"triangle": (3, 0), "diamond": (4, 45), "hexagon": (6, 0)}[SHAPES[shape]]
        draw.regular_polygon(centre, sides, rotation=rotation, fill=fill, outline=outline, width=width)
    if style == "clutter":
        for _ in range(3):
            cx, cy = rng.uniform(0, size), rng.uniform(0, size)
            draw.line([(cx, cy), (rng.uniform(0, size), rng.uniform(0, size))],
                      fill=tuple(rng.randrange(256) for _ in range(3)), width=width)
    return image


def _write_images(folder: Path, names: Sequence[str], index: int, count: int, style: str, seed: int,
                  tag: str, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        rng = random.Random(f"{seed}/{tag}/{index}/{i}")
        render_class_image(index, count, style, rng, size).save(folder / name, format="JPEG", quality=90)


def make_image_tree(
    root: Union[str, Path],
    layout: str = "coop",
    wnids: Sequence[str] = DEFAULT_WNIDS,
    train_per_class: int = 4,
    val_per_class: int = 2,
    variants: Sequence[str] = VARIANTS,
    subset_wnids: Optional[Sequence[str]] = None,
    size: int = 32,
    seed: int = 0,
    names: Optional[Sequence[str]] = None,
) -> Path:
    """Write a small ImageNet-family tree under `root` and return `root`.

    `wnids` are the classes (ImageNet wnids, or any ids: then `imagenet/classnames.txt` is written
    with `names` and defines the universe in the given order). -V2 folders are named by universe
    index; -A/-R hold `subset_wnids` only (default: every other class) with a README.txt in their root.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    root = Path(root)
    paths = {split: root / rel for split, rel in LAYOUTS[layout].items()}
    wnids = list(wnids)
    canonical = [wnid for wnid, _ in imagenet_classes()]
    if all(w in set(canonical) for w in wnids):
        universe_index = {w: canonical.index(w) for w in wnids}
    else:
        universe_index = {w: i for i, w in enumerate(wnids)}
        names = list(names) if names is not None else [f"class {w}" for w in wnids]
        (root / "imagenet").mkdir(parents=True, exist_ok=True)
        (root / "imagenet" / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(wnids, names)))
    subset = list(subset_wnids) if subset_wnids is not None else wnids[::2]
    count = len(wnids)
    val_counter = 0
    for index, wnid in enumerate(wnids):
        _write_images(paths["train"] / wnid, [f"{wnid}_{i}.JPEG" for i in range(train_per_class)],
                      index, count, STYLES["train"], seed, "train", size)
        val_names = [f"ILSVRC2012_val_{val_counter + i + 1:08d}.JPEG" for i in range(val_per_class)]
        val_counter += val_per_class
        _write_images(paths["val"] / wnid, val_names, index, count, STYLES["val"], seed, "val", size)
        for variant in variants:
            if variant in ("a", "r") and wnid not in subset:
                continue
            folder = str(universe_index[wnid]) if variant == "v2" else wnid
            extension = {"v2": "jpeg", "sketch": "JPEG", "a": "jpg", "r": "jpg"}[variant]
            _write_images(paths[variant] / folder, [f"{variant}_{i}.{extension}" for i in range(val_per_class)],
                          index, count, STYLES[variant], seed, variant, size)
    for variant in set(variants) & {"a", "r"}:
        paths[variant].mkdir(parents=True, exist_ok=True)
        (paths[variant] / "README.txt").write_text(f"Synthetic ImageNet-{variant.upper()} for tests.\n")
    return root


def make_class_folders(
    root: Union[str, Path],
    classes: Sequence[str],
    per_class: int = 4,
    style: str = "photo",
    seed: int = 0,
    size: int = 32,
    all_classes: Optional[Sequence[str]] = None,
) -> Path:
    """Write `root/<class>/<class>_<i>.jpg` for each of `classes` (a "bring your own data" folder) and
    return `root`. A class's colour and shape come from its position in `all_classes` (default
    `classes`), so a folder holding a subset of the classes draws them like the full one."""
    everything = list(all_classes) if all_classes is not None else list(classes)
    root = Path(root)
    for name in classes:
        index = everything.index(name)
        _write_images(root / name, [f"{name}_{i}.jpg" for i in range(per_class)], index, len(everything), style,
                      seed, f"folder/{style}", size)
    return root
