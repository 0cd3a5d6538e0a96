"""Regenerate prompts/ and datasets/ from open_clip's and timm's metadata (tests check they agree).

    python scripts/make_metadata.py            # write the files
    python scripts/make_metadata.py --check    # exit 1 if a committed file differs
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

DATASETS_README = """\
# Datasets

clipconv reads the ImageNet family from one data root (`--data-root $DATA`). It accepts the CoOp
layout (KaiyangZhou/CoOp, DATASETS.md) and the raw layouts the dataset authors ship; each set is
looked for in the order listed and the first existing folder wins. Check a root with

    python scripts/check_data.py --data-root $DATA            # add --verify to decode every image

No data at hand? The training and evaluation scripts take `--demo`, an offline mini benchmark that
generates its own small image trees.

| set | CoOp layout (first) | raw layouts | images | classes |
|---|---|---|---|---|
| ImageNet train | `imagenet/images/train/<wnid>/` | `imagenet/train/<wnid>/`, `train/<wnid>/` | 1,281,167 | 1000 |
| ImageNet val | `imagenet/images/val/<wnid>/` | `imagenet/val/<wnid>/`, `val/<wnid>/` | 50,000 | 1000 |
| ImageNet-V2 | `imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/` | `imagenetv2-matched-frequency-format-val/`, `ImageNetV2-matched-frequency/` | 10,000 | 1000 |
| ImageNet-Sketch | `imagenet-sketch/images/<wnid>/` | `imagenet-sketch/sketch/<wnid>/`, `sketch/<wnid>/` | 50,889 | 1000 |
| ImageNet-A | `imagenet-adversarial/imagenet-a/<wnid>/` | `imagenet-a/<wnid>/` | 7,500 | 200 |
| ImageNet-R | `imagenet-rendition/imagenet-r/<wnid>/` | `imagenet-r/<wnid>/` | 30,000 | 200 |

Image files may be .jpg/.jpeg/.png/.bmp/.webp in any letter case; hidden files (`.DS_Store`, `._x`)
and other files (`README.txt`) are ignored; symlinked split or class folders are followed.
Only the train split is required; a missing test set is skipped with a warning.

## Rules

- **Class index order = sorted wnids** (`imagenet_wnids.txt` here; the same order as
  `prompts/imagenet_classnames.txt`). The classes of a run are the wnid folders present under the
  train split, so an ImageNet-100-style subset works; every test set is mapped onto them and images
  of other classes are dropped (and counted).
- **ImageNet val must be sorted into class folders.** The official archive puts all 50,000 images in
  one folder; clipconv refuses that layout. Sort it once, e.g. with the widely used `valprep.sh`
  from the PyTorch ImageNet example (it runs `mkdir -p <wnid>` and `mv ILSVRC2012_val_XXXXXXXX.JPEG <wnid>/`
  for every image), or from the devkit: `ILSVRC2012_validation_ground_truth.txt` gives each image's
  ILSVRC2012_ID (line n = image n) and `data/meta.mat` maps that ID to its wnid (the ID order is not
  the sorted-wnid order).
  CoOp's layout ships val already sorted.
- **ImageNet-V2's folders are numbers**: folder `k` holds class index `k` (the k-th sorted wnid).
  The label is `int(folder name)`; sorting the folders as strings ("0", "1", "10", "100", ...) would be
  wrong. Folders outside 0..999 are reported and ignored.
- **ImageNet-A and -R have 200 classes each** (`imagenet_a_wnids.txt`, `imagenet_r_wnids.txt`, both a
  subset of the 1000). They are scored by an argmax over the logits of their classes only.
- `imagenet/classnames.txt` ("<id> <name>" per line, in index order) is optional. CoOp ships one; when
  its ids are not ImageNet wnids (the offline mini benchmark), it defines the class universe instead
  of the 1000 ImageNet classes. `--classnames FILE` overrides both.

## Your own data (the `folder` family)

A train folder of class folders plus any number of named test folders of class folders:

    python scripts/check_data.py --train-root my_data/train --eval-set photos=my_data/photos --eval-set sketch=my_data/sketches

The first `--eval-set` is the source column, the others are the shifted targets (their mean is the
target average). Class ids are the train folder names, labels follow their sorted order, and names
are the folder names with `_` read as spaces unless `--classnames FILE` (`<folder> <name>` lines, in
label order) says otherwise. A test folder may hold only some of the classes: it is scored with the
argmax restricted to them, like ImageNet-A/-R. A test class without a train folder is an error.

## Getting the data

- ImageNet-1k (ILSVRC2012): https://image-net.org (registration required); `train/` and a sorted `val/`.
- ImageNet-V2 matched-frequency: https://github.com/modestyachts/ImageNetV2
  (`imagenetv2-matched-frequency.tar.gz`, unpacks to `imagenetv2-matched-frequency-format-val/`).
- ImageNet-Sketch: https://github.com/HaohanWang/ImageNet-Sketch (`ImageNet-Sketch.zip` unpacks to `sketch/`).
- ImageNet-A: https://github.com/hendrycks/natural-adv-examples (`imagenet-a.tar`).
- ImageNet-R: https://github.com/hendrycks/imagenet-r (`imagenet-r.tar`).

## Files in this folder (generated by `scripts/make_metadata.py`; do not edit by hand)

- `imagenet_wnids.txt`: the 1000 wnids in class-index order.
- `imagenet_a_wnids.txt`, `imagenet_r_wnids.txt`: the 200 wnids of ImageNet-A / -R (sorted).
"""


def _timm_list(name: str) -> list[str]:
    from importlib import resources

    text = resources.files("timm.data").joinpath("_info", name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _template_lines(templates) -> str:
    """open_clip's templates are lambdas: render them with '{}' as the class name."""
    return "".join(template("{}") + "\n" for template in templates)


def render_metadata() -> dict[str, str]:
    """Every generated file as {path relative to the repo: text}."""
    from open_clip import zero_shot_metadata as meta

    wnids = _timm_list("imagenet_synsets.txt")
    if wnids != sorted(wnids) or len(wnids) != len(meta.IMAGENET_CLASSNAMES):
        raise RuntimeError("timm's wnids are not 1000 sorted ids matching open_clip's class names")
    return {
        "prompts/imagenet_classnames.txt": "".join(
            f"{wnid} {name}\n" for wnid, name in zip(wnids, meta.IMAGENET_CLASSNAMES)
        ),
        "prompts/templates/photo.txt": "a photo of a {}.\n",
        "prompts/templates/clip80.txt": _template_lines(meta.OPENAI_IMAGENET_TEMPLATES),
        "prompts/templates/tip.txt": _template_lines(meta.SIMPLE_IMAGENET_TEMPLATES),
        "datasets/imagenet_wnids.txt": "".join(f"{w}\n" for w in wnids),
        "datasets/imagenet_a_wnids.txt": "".join(f"{w}\n" for w in sorted(_timm_list("imagenet_a_synsets.txt"))),
        "datasets/imagenet_r_wnids.txt": "".join(f"{w}\n" for w in sorted(_timm_list("imagenet_r_synsets.txt"))),
        "datasets/README.md": DATASETS_README,
    }


def stale_files(root: Path = REPO_ROOT) -> list[str]:
    """Generated files that are missing or differ from what the packages say."""
    return [
        rel for rel, text in render_metadata().items()
        if not (root / rel).is_file() or (root / rel).read_text(encoding="utf-8") != text
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report files that differ; exit 1 if any")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for rel in stale:
            print(f"out of date: {rel}")
        return 1 if stale else 0
    sys.path.insert(0, str(REPO_ROOT))
    from clipconv.runtime.io import write_text

    for rel, text in render_metadata().items():
        write_text(REPO_ROOT / rel, text)
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
