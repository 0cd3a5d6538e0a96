"""A procedural miniature of the ImageNet domain-generalization suite (numpy + PIL, seeded, offline).

Classes are `pattern × shape` ("striped star"); colour, position, scale, rotation and background are
nuisances. Five test domains mirror ImageNet / -V2 / -Sketch / -R / -A and are written in CoOp's folder
layout, so the ImageNet loaders read a generated world unchanged. Same seed → same bytes.
"""
from __future__ import annotations

import colorsys
import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from clipconv.runtime.cache import cache_dir_problem
from clipconv.runtime.cpus import usable_cores
from clipconv.runtime.outputs import write_text

__all__ = [
    "SHAPES", "PATTERNS", "WorldClass", "WORLD_CLASSES", "Domain", "DOMAINS", "RENDITION_CLASSES",
    "ADVERSARIAL_CLASSES", "STYLES", "MANIFEST_NAME", "render", "generate_world", "ensure_world",
    "world_params", "default_world_root", "read_manifest", "generation_workers",
]

WORLD_VERSION = 4
MANIFEST_NAME = "clipconv_demo_world.json"
_MARKER_NAME = ".clipconv_demo_world_in_progress"
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "moon", "arrow")
PATTERNS = ("plain", "striped", "dotted", "checkered")


class WorldClass(NamedTuple):
    """One object class: index order = sorted id order."""

    index: int
    id: str
    name: str
    shape: str
    pattern: str


WORLD_CLASSES: tuple[WorldClass, ...] = tuple(
    WorldClass(i, f"m{i:03d}", f"{pattern} {shape}", shape, pattern)
    for i, (shape, pattern) in enumerate((s, p) for s in SHAPES for p in PATTERNS)
)
# Fixed class subsets (like the 200 wnids of ImageNet-R / -A): half of the classes each, overlapping.
RENDITION_CLASSES: tuple[int, ...] = (0, 1, 3, 5, 6, 9, 10, 12, 15, 17, 19, 20, 22, 25, 27, 30)
ADVERSARIAL_CLASSES: tuple[int, ...] = (1, 2, 3, 4, 7, 8, 11, 13, 14, 16, 18, 21, 23, 26, 28, 31)


@dataclass(frozen=True)
class Domain:
    """A test domain: where its tree lives under the root and which classes it holds."""

    name: str
    style: str
    directory: str  # relative to the world root, holds one folder per class
    classes: tuple[int, ...]
    numeric_folders: bool = False  # ImageNet-V2: folders are the integer class index
    readme: Optional[str] = None


_ALL = tuple(range(len(WORLD_CLASSES)))
DOMAINS: dict[str, Domain] = {
    "source": Domain("source", "source", "imagenet/images/val", _ALL),
    "v2": Domain("v2", "v2", "imagenetv2/imagenetv2-matched-frequency-format-val", _ALL, numeric_folders=True),
    "sketch": Domain("sketch", "sketch", "imagenet-sketch/images", _ALL),
    "rendition": Domain(
        "rendition", "rendition", "imagenet-rendition/imagenet-r", RENDITION_CLASSES,
        readme="imagenet-rendition/README.txt",
    ),
    "adversarial": Domain(
        "adversarial", "adversarial", "imagenet-adversarial/imagenet-a", ADVERSARIAL_CLASSES,
        readme="imagenet-adversarial/README.txt",
    ),
}
TRAIN_DIRECTORY = "imagenet/images/train"
CLASSNAMES_FILE = "imagenet/classnames.txt"
_TOP_LEVEL = ("imagenet", "imagenetv2", "imagenet-sketch", "imagenet-rendition", "imagenet-adversarial")


# ----------------------------------------------------------------------------------------------- styles
@dataclass(frozen=True)
class Style:
    """Nuisance ranges of one rendering style (sizes are fractions of the image side)."""

    kind: str  # "photo", "sketch" or "cartoon"
    radius: tuple[float, float] = (0.28, 0.38)
    centre: tuple[float, float] = (0.4, 0.6)
    rotation: float = 25.0  # degrees, ±
    period: tuple[float, float] = (0.42, 0.55)  # pattern period as a fraction of the object radius
    background_value: tuple[float, float] = (0.78, 0.97)
    background_saturation: tuple[float, float] = (0.0, 0.25)
    noise: float = 0.015
    blur: float = 0.0
    squash: float = 0.0  # max relative aspect distortion
    clutter: int = 0  # number of clutter strokes
    occluders: int = 0


STYLES: dict[str, Style] = {
    # test domains
    "source": Style("photo"),
    "v2": Style(  # the same photos, drifted: smaller, more rotated, softer focus, duller backgrounds
        "photo", radius=(0.23, 0.33), centre=(0.35, 0.65), rotation=50.0, period=(0.38, 0.58),
        background_value=(0.5, 0.9), background_saturation=(0.1, 0.5), noise=0.04, blur=0.9,
    ),
    "sketch": Style("sketch", radius=(0.27, 0.38), rotation=30.0, noise=0.03),
    "rendition": Style(
        "cartoon", radius=(0.26, 0.38), rotation=35.0, period=(0.35, 0.7), background_value=(0.55, 1.0),
        background_saturation=(0.5, 0.95), squash=0.3,
    ),
    "adversarial": Style(
        "photo", radius=(0.2, 0.28), centre=(0.3, 0.7), rotation=60.0, period=(0.4, 0.6),
        background_value=(0.35, 0.9), background_saturation=(0.1, 0.6), noise=0.05, clutter=8, occluders=1,
    ),
    # pretraining ("web") styles: broader photos, drawings and cartoons
    "photo": Style(
        "photo", radius=(0.24, 0.4), centre=(0.35, 0.65), rotation=35.0, period=(0.38, 0.6),
        background_value=(0.5, 0.97), background_saturation=(0.0, 0.5), noise=0.03, clutter=1,
    ),
    "drawing": Style("sketch", radius=(0.24, 0.4), rotation=35.0, noise=0.03),
    "cartoon": Style(
        "cartoon", radius=(0.24, 0.4), rotation=35.0, period=(0.35, 0.7), background_value=(0.55, 1.0),
        background_saturation=(0.4, 0.95), squash=0.25,
    ),
}

_SUPERSAMPLE = 2

# Shapes in unit coordinates (y points down): ("poly", points, fill) or ("disc", (x, y, radius), fill).
_STAR = [
    (float(np.cos(a) * r), float(np.sin(a) * r))
    for k in range(10)
    for a, r in [(-np.pi / 2 + k * np.pi / 5, 1.0 if k % 2 == 0 else 0.42)]
]
_SHAPE_PARTS: dict[str, list] = {
    "circle": [("disc", (0.0, 0.0, 0.95), 255)],
    "square": [("poly", [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)], 255)],
    "triangle": [("poly", [(0.0, -1.0), (0.97, 0.72), (-0.97, 0.72)], 255)],
    "star": [("poly", _STAR, 255)],
    "cross": [("poly", [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1),
                        (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)], 255)],
    "heart": [("disc", (-0.45, -0.3, 0.52), 255), ("disc", (0.45, -0.3, 0.52), 255),
              ("poly", [(-0.95, -0.12), (0.95, -0.12), (0.0, 0.95)], 255)],
    "moon": [("disc", (0.0, 0.0, 1.0), 255), ("disc", (0.48, -0.22, 0.82), 0)],
    "arrow": [("poly", [(-1, -0.28), (0.15, -0.28), (0.15, -0.75), (1, 0), (0.15, 0.75), (0.15, 0.28),
                        (-1, 0.28)], 255)],
}


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _shape_mask(shape: str, side: int, centre: tuple[float, float], radius: float, angle: float,
                aspect: tuple[float, float]) -> np.ndarray:
    """Boolean mask of a shape drawn at `centre` (pixels) with `radius`, rotation and aspect."""
    cos, sin = np.cos(angle), np.sin(angle)

    def place(x: float, y: float) -> tuple[float, float]:
        x, y = x * aspect[0] * radius, y * aspect[1] * radius
        return centre[0] + cos * x - sin * y, centre[1] + sin * x + cos * y

    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    for kind, geometry, fill in _SHAPE_PARTS[shape]:
        if kind == "poly":
            draw.polygon([place(x, y) for x, y in geometry], fill=fill)
        else:
            x, y, r = geometry
            cx, cy = place(x, y)
            rr = r * radius * (aspect[0] + aspect[1]) / 2
            draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=fill)
    return np.asarray(canvas) > 127


def _pattern_mask(pattern: str, side: int, period: float, angle: float, phase: tuple[float, float]) -> np.ndarray:
    """Boolean 'ink' mask of a surface pattern over the whole canvas (rotated lattice)."""
    if pattern == "plain":
        return np.zeros((side, side), dtype=bool)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    u = (np.cos(angle) * xx + np.sin(angle) * yy) / period + phase[0]
    v = (-np.sin(angle) * xx + np.cos(angle) * yy) / period + phase[1]
    if pattern == "striped":
        return (u % 1.0) < 0.5
    if pattern == "dotted":
        return ((u % 1.0) - 0.5) ** 2 + ((v % 1.0) - 0.5) ** 2 < 0.3**2
    if pattern == "checkered":
        return (np.floor(u) + np.floor(v)) % 2 == 0
    raise ValueError(f"unknown pattern '{pattern}'")


def _edges(mask: np.ndarray, width: int) -> np.ndarray:
    """Boundary pixels of a mask, about `width` pixels thick."""
    edge = np.zeros_like(mask)
    for axis in (0, 1):
        edge |= mask ^ np.roll(mask, 1, axis=axis)
    for _ in range(width - 1):
        edge = edge | np.roll(edge, 1, axis=0) | np.roll(edge, 1, axis=1)
    return edge


def _background(rng: np.random.Generator, side: int, style: Style) -> np.ndarray:
    """A soft two-colour gradient with mild noise."""
    hue = rng.random()
    top = _hsv(hue, _uniform(rng, style.background_saturation), _uniform(rng, style.background_value))
    bottom = np.clip(top + rng.uniform(-0.08, 0.08, size=3).astype(np.float32), 0, 1)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    t = np.clip(0.5 + (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)), 0, 1)[..., None]
    return top * (1 - t) + bottom * t


def _add_clutter(rng: np.random.Generator, image: np.ndarray, count: int) -> np.ndarray:
    """Random coloured strokes and blobs (not class shapes)."""
    side = image.shape[0]
    canvas = Image.fromarray((image * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(count):
        colour = tuple(int(c * 255) for c in _hsv(rng.random(), rng.uniform(0.2, 1), rng.uniform(0.2, 1)))
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, side, size=4))
        if rng.random() < 0.6:
            draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(1, 3 * _SUPERSAMPLE)))
        else:
            r = rng.uniform(0.03, 0.1) * side
            draw.ellipse([x0 - r, y0 - r * rng.uniform(0.4, 1), x0 + r, y0 + r], fill=colour)
    return np.asarray(canvas, dtype=np.float32) / 255


def _geometry(rng: np.random.Generator, style: Style, side: int):
    radius = _uniform(rng, style.radius) * side
    centre = (_uniform(rng, style.centre) * side, _uniform(rng, style.centre) * side)
    angle = np.deg2rad(rng.uniform(-style.rotation, style.rotation))
    stretch = 1 + rng.uniform(-style.squash, style.squash)
    aspect = (stretch, 1 / stretch)
    period = _uniform(rng, style.period) * radius
    pattern_angle = angle + rng.choice([0.0, np.pi / 2]) + rng.uniform(-0.3, 0.3)
    phase = (rng.random(), rng.random())
    return radius, centre, angle, aspect, period, pattern_angle, phase


def _render_photo(rng, cls: WorldClass, style: Style, side: int) -> np.ndarray:
    radius, centre, angle, aspect, period, p_angle, phase = _geometry(rng, style, side)
    image = _background(rng, side, style)
    if style.clutter:
        image = _add_clutter(rng, image, int(rng.integers(style.clutter // 2, style.clutter + 1)))
    shape = _shape_mask(cls.shape, side, centre, radius, angle, aspect)
    ink = _pattern_mask(cls.pattern, side, period, p_angle, phase) & shape
    shadow = np.roll(shape, (int(0.06 * radius) + 1, int(0.06 * radius) + 1), axis=(0, 1)) & ~shape
    image[shadow] *= 0.75
    body = _hsv(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.45, 0.95))
    ink_colour = body * 0.3 if rng.random() < 0.5 else body * 0.25 + 0.75
    yy = np.mgrid[0:side, 0:side][0].astype(np.float32)
    shade = (1.0 - 0.18 * (yy - centre[1]) / max(radius, 1.0))[..., None]  # light from above
    image = np.where(shape[..., None], np.clip(body * shade, 0, 1), image)
    image = np.where(ink[..., None], np.clip(ink_colour * shade, 0, 1), image)
    for _ in range(style.occluders):
        ow, oh = rng.uniform(0.5, 1.0) * radius, rng.uniform(0.5, 1.0) * radius
        ox = centre[0] + rng.choice([-1, 1]) * rng.uniform(0.35, 0.8) * radius - ow / 2
        oy = centre[1] + rng.uniform(-0.7, 0.7) * radius - oh / 2
        colour = _hsv(rng.random(), rng.uniform(0, 0.8), rng.uniform(0.2, 0.9))
        y0, y1 = int(max(oy, 0)), int(min(oy + oh, side))
        x0, x1 = int(max(ox, 0)), int(min(ox + ow, side))
        image[y0:y1, x0:x1] = colour
    return image


def _render_sketch(rng, cls: WorldClass, style: Style, side: int) -> np.ndarray:
    radius, centre, angle, aspect, period, p_angle, phase = _geometry(rng, style, side)
    paper = rng.uniform(0.86, 0.98)
    image = np.full((side, side), paper, dtype=np.float32)
    shape = _shape_mask(cls.shape, side, centre, radius, angle, aspect)
    ink = _pattern_mask(cls.pattern, side, period, p_angle, phase) & shape
    lines = _edges(shape, 2 * _SUPERSAMPLE - 1) | (_edges(ink, _SUPERSAMPLE) & shape)
    image[lines] = rng.uniform(0.1, 0.45)
    for _ in range(int(rng.integers(0, 4))):  # stray pencil strokes
        canvas = Image.fromarray((image * 255).astype(np.uint8))
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, side, size=4))
        ImageDraw.Draw(canvas).line([x0, y0, x1, y1], fill=int(rng.uniform(150, 210)), width=_SUPERSAMPLE)
        image = np.asarray(canvas, dtype=np.float32) / 255
    return np.repeat(image[..., None], 3, axis=2)


def _render_cartoon(rng, cls: WorldClass, style: Style, side: int) -> np.ndarray:
    radius, centre, angle, aspect, period, p_angle, phase = _geometry(rng, style, side)
    image = np.empty((side, side, 3), dtype=np.float32)
    image[:] = _hsv(rng.random(), _uniform(rng, style.background_saturation), _uniform(rng, style.background_value))
    shape = _shape_mask(cls.shape, side, centre, radius, angle, aspect)
    ink = _pattern_mask(cls.pattern, side, period, p_angle, phase) & shape
    hue = rng.random()
    image[shape] = _hsv(hue, rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0))
    image[ink] = _hsv(hue + rng.uniform(0.33, 0.67), rng.uniform(0.7, 1.0), rng.uniform(0.6, 1.0))
    image[(_edges(ink, _SUPERSAMPLE) & shape)] = 0.05
    image[_edges(shape, 3 * _SUPERSAMPLE)] = 0.05
    return image


_RENDERERS = {"photo": _render_photo, "sketch": _render_sketch, "cartoon": _render_cartoon}


def render(class_index: int, domain: str, rng: np.random.Generator, image_size: int = 64) -> Image.Image:
    """Render one RGB image of class `class_index` in the style of `domain` (a DOMAINS or STYLES name)."""
    if not 0 <= class_index < len(WORLD_CLASSES):
        raise ValueError(f"class_index must be in [0, {len(WORLD_CLASSES)}), got {class_index}")
    if domain not in STYLES:
        raise ValueError(f"unknown domain '{domain}'; choose one of {sorted(STYLES)}")
    style = STYLES[domain]
    side = image_size * _SUPERSAMPLE
    pixels = _RENDERERS[style.kind](rng, WORLD_CLASSES[class_index], style, side)
    if style.noise:
        grain_shape = pixels.shape[:2] + (1,) if style.kind == "sketch" else pixels.shape  # sketches stay grey
        pixels = pixels + rng.normal(0, style.noise, size=grain_shape).astype(np.float32)
    image = Image.fromarray((np.clip(pixels, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")
    image = image.resize((image_size, image_size), Image.Resampling.BOX)
    if style.blur:
        image = image.filter(ImageFilter.GaussianBlur(style.blur))
    return image


# ------------------------------------------------------------------------------------------- the tree
_WORLD_STREAM = 0x776F726C64  # "world": keeps benchmark images disjoint from any other seed stream
_SPLIT_CODES = {"train": 0, "source": 1, "v2": 2, "sketch": 3, "rendition": 4, "adversarial": 5}


def image_rng(seed: int, split: str, class_index: int, image_index: int) -> np.random.Generator:
    """The generator behind one benchmark image (independent per split, class and image)."""
    return np.random.default_rng([_WORLD_STREAM, seed, _SPLIT_CODES[split], class_index, image_index])


def world_params(seed: int = 0, train_per_class: int = 48, test_per_class: int = 50, image_size: int = 64) -> dict:
    """Validated generation parameters (also what the manifest and the cache name record)."""
    for name, value, low in (("train_per_class", train_per_class, 1), ("test_per_class", test_per_class, 1),
                             ("image_size", image_size, 16)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")
    return {"version": WORLD_VERSION, "seed": int(seed), "train_per_class": int(train_per_class),
            "test_per_class": int(test_per_class), "image_size": int(image_size)}


def default_world_root(params: dict) -> Path:
    """`$CLIPCONV_CACHE` (or ~/.cache/clipconv) / demo-world-<hash of params>."""
    base = Path(os.environ.get("CLIPCONV_CACHE") or Path.home() / ".cache" / "clipconv")
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return base / f"demo-world-{digest}"


def read_manifest(root: Union[str, Path]) -> Optional[dict]:
    """The manifest of a finished world, or None when the world is missing or unfinished."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _class_folder(domain: Domain, cls: WorldClass) -> str:
    return str(cls.index) if domain.numeric_folders else cls.id


Job = tuple[str, str, int, int]


def _jobs(params: dict) -> Iterator[Job]:
    """(split, relative folder, class index, image index) for every image of the world."""
    for cls in WORLD_CLASSES:
        for i in range(params["train_per_class"]):
            yield "train", f"{TRAIN_DIRECTORY}/{cls.id}", cls.index, i
    for domain in DOMAINS.values():
        for index in domain.classes:
            folder = f"{domain.directory}/{_class_folder(domain, WORLD_CLASSES[index])}"
            for i in range(params["test_per_class"]):
                yield domain.name, folder, index, i


_README = (
    "Miniature {title} generated by clipconv.data.demo_world (procedural, not the real dataset).\n"
    "It holds {n} of the {total} classes, one folder per class id, like the real {title} holds 200 of\n"
    "ImageNet's 1000 classes. Score it with an argmax over these classes only.\n"
)


MAX_WORKERS = 8  # generation processes at most, however many cores are usable
_CHUNK = 128  # images per worker task at most (smaller for small worlds, so every worker gets several)


def generation_workers() -> int:
    """Processes that render a world: the usable cores (CPU affinity where known), at most MAX_WORKERS."""
    return max(1, min(usable_cores(), MAX_WORKERS))


def _render_jobs(root: str, params: dict, jobs: Sequence[Job]) -> int:
    """Render and save `jobs` (the whole world, or one worker's chunk); returns how many were written.

    Every image is seeded by its own (split, class, index), so its bytes do not depend on which process
    renders it or in which order.
    """
    made: set[str] = set()
    size = params["image_size"]
    for split, folder, class_index, i in jobs:
        directory = Path(root) / folder
        if folder not in made:
            directory.mkdir(parents=True, exist_ok=True)
            made.add(folder)
        style = "source" if split == "train" else DOMAINS[split].style
        image = render(class_index, style, image_rng(params["seed"], split, class_index, i), size)
        image.save(directory / f"{WORLD_CLASSES[class_index].id}_{i:04d}.jpg", quality=90)
    return len(jobs)


def _exit_with_parent(parent: int) -> None:
    """Worker thread: end this worker when the generating process has died (killed mid-generation)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _init_worker(parent: int) -> None:
    """A worker renders only (numpy + PIL): Ctrl-C is the parent's to handle, and it dies with its parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _render_in_parallel(root: Path, params: dict, jobs: list[Job], workers: int) -> None:
    """Render `jobs` in `workers` processes, in contiguous chunks; the first failure fails them all."""
    chunk = max(1, min(_CHUNK, -(-len(jobs) // (4 * workers))))
    # fork: workers start at once and inherit the imported modules (the world's module imports torch, which a
    # spawned worker would import again); they use only numpy and PIL, never torch's thread pools.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(os.getpid(),)) as pool:
        futures = [pool.submit(_render_jobs, str(root), params, jobs[start:start + chunk])
                   for start in range(0, len(jobs), chunk)]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f in done and f.exception() is not None), None)
            if failed is not None:
                error = failed.exception()
                raise RuntimeError(f"generating the demo world in '{root}' failed in a worker process: "
                                   f"{type(error).__name__}: {error}; the world was not marked complete and "
                                   "is regenerated on next use") from error
        finally:  # on any failure (or Ctrl-C): drop the chunks not started, let the running ones finish
            for future in futures:
                future.cancel()


def _write_tree(root: Path, params: dict, workers: int) -> dict[str, int]:
    jobs = list(_jobs(params))
    if workers > 1 and len(jobs) > 1:
        _render_in_parallel(root, params, jobs, workers)
    else:
        _render_jobs(str(root), params, jobs)
    counts: dict[str, int] = {}
    for split, *_ in jobs:
        counts[split] = counts.get(split, 0) + 1
    (root / CLASSNAMES_FILE).write_text("".join(f"{c.id} {c.name}\n" for c in WORLD_CLASSES))
    for domain in DOMAINS.values():
        if domain.readme:
            title = "ImageNet-" + ("R" if domain.name == "rendition" else "A")
            (root / domain.readme).write_text(_README.format(title=title, n=len(domain.classes),
                                                             total=len(WORLD_CLASSES)))
    return counts


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialize generation of one root across processes (POSIX advisory lock beside it)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as handle:
        try:

            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        yield


def generate_world(root: Union[str, Path], seed: int = 0, train_per_class: int = 48, test_per_class: int = 50,
                   image_size: int = 64, workers: Optional[int] = None) -> Path:
    """Write the miniature world under `root` (idempotent) and return `root`.

    A finished world carries a manifest written last (atomically); calling again with the same
    parameters does nothing. A half-written world (interrupted run) is wiped and regenerated.
    `workers` processes render the images (default `generation_workers()`; 1 renders in this process);
    the files are the same bytes whatever the number.
    """
    params = world_params(seed, train_per_class, test_per_class, image_size)
    if workers is None:
        workers = generation_workers()
    if not isinstance(workers, (int, np.integer)) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be an integer ≥ 1, got {workers!r}")
    root = Path(root).expanduser()
    with _locked(root):
        manifest = read_manifest(root)
        if manifest is not None:
            if manifest.get("params") == params:
                return root
            raise ValueError(
                f"'{root}' already holds a demo world generated with {manifest.get('params')}, not {params}; "
                "pass another root or delete that directory"
            )
        if root.exists() and any(root.iterdir()) and not (root / _MARKER_NAME).exists():
            raise ValueError(f"'{root}' is not empty and is not a clipconv demo world; choose an empty directory")
        root.mkdir(parents=True, exist_ok=True)
        (root / _MARKER_NAME).write_text("generation in progress; delete this directory if it is stale\n")
        for name in _TOP_LEVEL:  # leftovers of an interrupted run
            shutil.rmtree(root / name, ignore_errors=True)
        counts = _write_tree(root, params, int(workers))
        manifest = {
            "generator": "clipconv.data.demo_world",
            "params": params,
            "classes": [{"index": c.index, "id": c.id, "name": c.name} for c in WORLD_CLASSES],
            "train_directory": TRAIN_DIRECTORY,
            "classnames": CLASSNAMES_FILE,
            "domains": {d.name: {"directory": d.directory, "classes": list(d.classes),
                                 "numeric_folders": d.numeric_folders} for d in DOMAINS.values()},
            "counts": counts,
        }
        write_text(root / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
        (root / _MARKER_NAME).unlink()
    return root


def ensure_world(root: Union[str, Path, None] = None, **kwargs) -> Path:
    """A finished world for these parameters, generated on first use (default root: the cache)."""
    params = world_params(**kwargs)
    target = Path(root).expanduser() if root is not None else default_world_root(params)
    problem = cache_dir_problem(target.parent)
    if problem:  # before the lock file beside the world is opened
        where = "CLIPCONV_CACHE" if root is None else "the demo world's folder"
        raise ValueError(f"{where}: {problem}, so the demo world cannot be generated there; "
                         f"set {'CLIPCONV_CACHE' if root is None else 'it'} to a writable folder")
    return generate_world(target, **{k: v for k, v in params.items() if k != "version"})
