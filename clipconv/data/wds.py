"""The `wds` family: CLIP_benchmark's webdataset shards of ImageNet and its variants, read with `webdataset`.

Layout (as written by CLIP_benchmark's `clip_benchmark_export_wds` / `convert_dataset`), under one root:

    <root>/wds_imagenet1k/{classnames.txt, zeroshot_classification_templates.txt, train/, test/}
    <root>/wds_imagenetv2/..., wds_imagenet_sketch/..., wds_imagenet-a/..., wds_imagenet-r/...   (test/ only)
    <split>/0.tar, 1.tar, ... (+ nshards.txt: their count, when present it must match the files)

A sample is `<key>.{jpg,jpeg,png,webp}` + `<key>.cls` (the integer label). Class mapping:
- the universe: `wds_imagenet1k/classnames.txt`. 1000 names = ImageNet: labels are ImageNet class indices,
  ids the sorted wnids and names the project's CLIP names (as in the `imagenet` family). Every other list:
  the names themselves are the classes (a generic CLIP_benchmark classification set). `classnames=FILE`
  (`<id> <name>` lines, one per label) overrides it.
- -A/-R: CLIP_benchmark builds them with torchvision's ImageFolder over their 200 wnid folders, so their
  labels are 0..199 in sorted-wnid order; label j is the j-th wnid of timm's `imagenet_{a,r}_synsets.txt`
  (clipconv/assets/imagenet_{a,r}_wnids.txt), scored with the argmax over those 200 classes. Their
  classnames.txt, when present, must name the same classes.
- other sets: the same labels as the universe when their classnames.txt is absent or equal to it;
  otherwise each name is matched to the one universe class of that name (a set over fewer classes is
  scored with the argmax restricted to them).

A sample's path (relative to the root) is `<set folder>/<split>/<n>.tar#<key>`. Listing a split reads
each shard once with `webdataset` (keys and labels; cached under `$CLIPCONV_CACHE/wds-index`, keyed by
the SHA-256 of the shard's bytes, which is computed again whenever the file's inode, size, mtime or ctime
changes). Evaluation streams the shards in order (every sample once; DataLoader workers take whole
shards). K-shot training: the split is drawn from the train listing with the usual seeded logic, then the
chosen samples are read in one pass over their shards and kept as files under
`$CLIPCONV_CACHE/wds-samples/<shard SHA-256>/` named by the SHA-256 of their bytes, checked before each
use (a damaged or replaced file is extracted again); epochs, augmentation rounds and shuffling then read
them as ordinary files. A damaged shard, a sample without image or label, or a label outside the
class list is a `DataLayoutError` naming the shard.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from PIL import Image, UnidentifiedImageError

from clipconv.data.family import IMAGENET_PUBLISHED_LABEL, DatasetFamily, register_family
from clipconv.data.folder import BadImage, ImageListDataset, Sample
from clipconv.data.imagenet import EVAL_SET_SPECS, ClassList, DataLayoutError, EvalSplit, warn_few_classes
from clipconv.data.images import ImageDecodeError
from clipconv.prompts import imagenet_classes, load_classnames_file
from clipconv.runtime.cache import cache_root
from clipconv.runtime.io import OutputWriteError, new_file_mode
from clipconv.runtime.jsontypes import JSONObject
from clipconv.runtime.outputs import write_json
from clipconv.runtime.seeding import seed_item

__all__ = ["WdsFamily", "WDS_FOLDERS", "SHARD_SEPARATOR", "IMAGE_KEYS", "is_shard_sample", "shard_paths",
           "index_shard", "shard_digest", "ShardStream", "ExtractedShardSamples", "image_dataset", "as_files", "extract_samples",
           "read_templates_file", "subset_wnids"]

PathLike = Union[str, Path]

#: our set name -> CLIP_benchmark's folder (its dataset name is "wds/" + the folder without "wds_")
WDS_FOLDERS = {
    "imagenet": "wds_imagenet1k",
    "imagenet_v2": "wds_imagenetv2",
    "imagenet_sketch": "wds_imagenet_sketch",
    "imagenet_a": "wds_imagenet-a",
    "imagenet_r": "wds_imagenet-r",
}
SUBSET_ASSETS = {"imagenet_a": "imagenet_a_wnids.txt", "imagenet_r": "imagenet_r_wnids.txt"}
SHARD_SEPARATOR = "#"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
_SHARD = re.compile(r"^(\d+)\.tar$")
WDS_HELP = (
    "Give --data-root the folder holding CLIP_benchmark's wds_imagenet1k (with train/ and test/ shard folders and "
    "classnames.txt), wds_imagenetv2, wds_imagenet_sketch, wds_imagenet-a and wds_imagenet-r."
)


def _cache_root() -> Path:

    return cache_root()


# ------------------------------------------------------------------------------------------ shards
def is_shard_sample(path: str) -> bool:
    """True for a sample path `<...>/<n>.tar#<key>` (a sample inside a webdataset shard)."""
    shard, sep, key = str(path).partition(SHARD_SEPARATOR)
    return bool(sep and key and shard.endswith(".tar"))


def _split_ref(path: str) -> tuple[str, str]:
    shard, _, key = str(path).partition(SHARD_SEPARATOR)
    return shard, key


def shard_paths(split_dir: Path) -> list[Path]:
    """The shards of one split folder in order (0.tar, 1.tar, ...); nshards.txt, when present, must match."""
    if not split_dir.is_dir():
        raise DataLayoutError(f"shard folder '{split_dir}' does not exist. {WDS_HELP}")
    numbered = sorted((int(m.group(1)), entry) for entry in os.listdir(split_dir) if (m := _SHARD.match(entry)))
    count_file = split_dir / "nshards.txt"
    if count_file.is_file():
        text = count_file.read_text(encoding="utf-8").strip()
        if not text.isdigit():
            raise DataLayoutError(f"'{count_file}' should hold the number of shards, got {text[:40]!r}")
        expected = int(text)
        missing = [f"{i}.tar" for i in range(expected) if not (split_dir / f"{i}.tar").is_file()]
        if missing:
            raise DataLayoutError(f"'{split_dir}' lacks {len(missing)} of the {expected} shards nshards.txt announces: "
                                  f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        return [split_dir / f"{i}.tar" for i in range(expected)]
    if not numbered:
        raise DataLayoutError(f"'{split_dir}' holds no shards (expected 0.tar, 1.tar, ...). {WDS_HELP}")
    return [split_dir / name for _, name in numbered]


def _label(sample: dict, shard: Path) -> int:
    raw = sample.get("cls")
    key = sample.get("__key__")
    if raw is None:
        raise DataLayoutError(f"shard '{shard}': sample '{key}' has no .cls label")
    try:
        return int(raw.decode("utf-8").strip() if isinstance(raw, bytes) else raw)
    except ValueError:
        raise DataLayoutError(f"shard '{shard}': sample '{key}' has a .cls that is not an integer ({raw[:20]!r})") from None


def _image_key(sample: dict, shard: Path) -> str:
    found = [ext for ext in IMAGE_KEYS if ext in sample]
    if not found:
        raise DataLayoutError(f"shard '{shard}': sample '{sample.get('__key__')}' has no image "
                              f"({', '.join('.' + e for e in IMAGE_KEYS)})")
    return found[0]


class _HashingReader:
    """A binary stream that passes every byte read through it to `update` (a shard hashed while it is listed)."""

    def __init__(self, stream: io.BufferedReader, update: Callable[[bytes], None]) -> None:
        self._stream, self._update = stream, update
        self.name = stream.name

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._update(data)
        return data

    def drain(self) -> None:
        """Read the rest (the tar's end padding), so `update` has seen every byte of the file."""
        while self.read(_DIGEST_CHUNK):
            pass


def _iterate(shard: Path, update: Optional[Callable[[bytes], None]] = None) -> Iterator[dict]:
    """The samples of one shard (webdataset's tar expansion and key grouping over a file this function opens and
    closes, also when the caller stops early); a damaged or missing tar raises a DataLayoutError naming it.
    `update` (e.g. a hash's) is given every byte of the file, in order, once the samples are all read."""
    try:
        from webdataset.tariterators import group_by_keys, tar_file_expander  # optional extra [wds]: only this family
    except ImportError:
        raise DataLayoutError("the wds family reads shards with the `webdataset` library, which is not installed: "
                              "pip install -e \".[wds]\" (or pip install webdataset)") from None

    try:
        stream = open(shard, "rb")
    except OSError as err:
        raise DataLayoutError(f"shard '{shard}' cannot be read ({err.strerror or err}); download it again") from None
    with stream:
        source = _HashingReader(stream, update) if update is not None else stream
        iterator = iter(group_by_keys(tar_file_expander([{"url": str(shard), "stream": source}])))
        while True:
            try:
                sample = next(iterator)
            except StopIteration:
                if isinstance(source, _HashingReader):
                    source.drain()
                return
            except DataLayoutError:
                raise
            except Exception as err:  # tarfile.ReadError, truncated stream, ... (webdataset re-raises them)
                raise DataLayoutError(f"shard '{shard}' is damaged ({type(err).__name__}: {err}); "
                                      "download it again") from None
            yield sample


def _shard_identity(shard: Path) -> str:
    """What changes whenever the file's bytes may have: device, inode, size, modification and status-change
    time. A rewrite always moves st_ctime, which (unlike st_mtime) no one can set back."""
    stat = shard.stat()
    text = f"{shard.resolve()}\n{stat.st_dev}:{stat.st_ino}\n{stat.st_size}\n{stat.st_mtime_ns}\n{stat.st_ctime_ns}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:40]


_DIGESTS: dict[str, str] = {}  # shard identity -> SHA-256 of its bytes (this process)
_DIGEST_CHUNK = 1 << 20


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_DIGEST_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _changed(shard: Path) -> DataLayoutError:
    return DataLayoutError(f"shard '{shard}' changed while it was read; run again once it is complete")


def _memo_path(identity: str) -> Path:
    return _cache_root() / "wds-index" / f"identity-{identity}.json"


def _remembered_digest(identity: str, use_cache: bool) -> Optional[str]:
    """The SHA-256 already known for a shard identity (this process, else its memo file), or None."""
    if identity in _DIGESTS:
        return _DIGESTS[identity]
    memo = _memo_path(identity)
    if not (use_cache and memo.is_file()):
        return None
    try:
        stored = json.loads(memo.read_text(encoding="utf-8")).get("sha256")
    except (ValueError, OSError, AttributeError):
        return None  # a damaged memo: hash again
    if not (isinstance(stored, str) and re.fullmatch(r"[0-9a-f]{64}", stored)):
        return None
    _DIGESTS[identity] = stored
    return stored


def _remember_digest(shard: Path, identity: str, digest: str, use_cache: bool) -> None:
    """Record the SHA-256 of the bytes just read under the identity the shard had before they were read; a
    shard whose identity moved meanwhile is a DataLayoutError (it was rewritten while it was read)."""
    if _shard_identity(shard) != identity:
        raise _changed(shard)
    _DIGESTS[identity] = digest
    if use_cache:
        try:
            write_json(_memo_path(identity), {"shard": str(shard.resolve()), "sha256": digest})
        except OutputWriteError as err:
            warnings.warn(f"webdataset shard digest not cached: {err}", stacklevel=4)


def shard_digest(shard: Path, use_cache: bool = True) -> str:
    """SHA-256 of the shard's bytes: what its listing and extracted samples are keyed by. The bytes are hashed
    once per identity (`_shard_identity`), remembered under `$CLIPCONV_CACHE/wds-index/identity-*.json`."""
    identity = _shard_identity(shard)
    digest = _remembered_digest(identity, use_cache)
    if digest is None:
        digest = _hash_file(shard)
        _remember_digest(shard, identity, digest, use_cache)
    return digest


def index_shard(shard: Path, use_cache: bool = True) -> list[tuple[str, int]]:
    """[(key, label)] of one shard in stored order (read once with webdataset, then cached under the
    SHA-256 of the shard's bytes: a shard rewritten with other labels is listed again whatever its times).
    A shard whose identity is new is hashed while it is listed: one read of its bytes, not two."""
    identity = _shard_identity(shard)
    digest = _remembered_digest(identity, use_cache)
    if digest is not None and use_cache:
        entry = _cache_root() / "wds-index" / f"{digest[:40]}.json"
        if entry.is_file():
            try:
                payload = json.loads(entry.read_text(encoding="utf-8"))
                if payload.get("sha256") == digest:
                    return [(str(k), int(v)) for k, v in payload["samples"]]
            except (ValueError, KeyError, TypeError, AttributeError):
                pass  # a damaged index entry is rebuilt
    hashing = hashlib.sha256() if digest is None else None
    listed, seen = [], set()
    for sample in _iterate(shard, hashing.update if hashing is not None else None):
        key = sample["__key__"]
        if key in seen:
            raise DataLayoutError(f"shard '{shard}': sample key '{key}' appears twice")
        seen.add(key)
        _image_key(sample, shard)
        listed.append((key, _label(sample, shard)))
    if hashing is not None:
        digest = hashing.hexdigest()
        _remember_digest(shard, identity, digest, use_cache)  # the identity it had before it was read
    elif shard_digest(shard, use_cache) != digest:  # rewritten while it was listed
        raise _changed(shard)
    if use_cache:
        try:
            write_json(_cache_root() / "wds-index" / f"{digest[:40]}.json", {"sha256": digest, "samples": listed})
        except OutputWriteError as err:
            warnings.warn(f"webdataset index not cached: {err}", stacklevel=2)
    return listed


def _decode(data: bytes, where: str, draft_size: Optional[int] = None) -> Image.Image:
    """RGB image from encoded bytes (as `load_rgb` decodes a file); ImageDecodeError naming `where`."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if draft_size and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = "empty file" if not data else f"{type(err).__name__}: {err}"
        raise ImageDecodeError(f"cannot decode image '{where}' ({reason})") from err


# ----------------------------------------------------------------------------------------- readers
class ShardStream(torch.utils.data.IterableDataset):
    """`(image, label)` of shard samples (paths `<shard>#<key>` relative to `root`), streamed in shard order.

    Only the shards holding the given samples are read, each once; DataLoader workers split them by
    shard (so the order across workers interleaves: callers match items by their label, e.g. the position
    FeatureStore passes). `round_seed`: torch is seeded with `item_seed(round_seed, i)` before transforming
    the i-th given sample (as FeatureStore's map-style path does; `seed_offset` is added to i, for a slice
    of a longer list, e.g. one rank's share under torchrun). Undecodable images: `BadImage`
    (on_error="skip") or ImageDecodeError (on_error="raise"); a listed sample the shard no longer holds: `BadImage`.
    """

    def __init__(self, root: PathLike, samples: Sequence[Sample], transform: Optional[Callable] = None,
                 on_error: str = "skip", round_seed: Optional[int] = None, draft_size: Optional[int] = None,
                 seed_offset: int = 0) -> None:
        self.root = Path(root)
        self.samples = [(str(p), int(label)) for p, label in samples]
        self.transform, self.on_error, self.round_seed, self.draft_size = transform, on_error, round_seed, draft_size
        self.seed_offset = seed_offset
        self.wanted: dict[str, dict[str, int]] = {}
        for position, (path, _) in enumerate(self.samples):
            shard, key = _split_ref(path)
            self.wanted.setdefault(shard, {})[key] = position
        self.shards = sorted(self.wanted, key=_shard_order)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self):

        info = torch.utils.data.get_worker_info()
        shards = self.shards if info is None else self.shards[info.id::info.num_workers]
        for shard in shards:
            wanted = self.wanted[shard]
            seen = set()
            for sample in _iterate(self.root / shard):
                position = wanted.get(sample["__key__"])
                if position is None:
                    continue
                seen.add(sample["__key__"])
                where = f"{self.root / shard}{SHARD_SEPARATOR}{sample['__key__']}"
                try:
                    image = _decode(sample[_image_key(sample, self.root / shard)], where, self.draft_size)
                except ImageDecodeError as err:
                    if self.on_error == "raise":
                        raise
                    yield BadImage(where, str(err))
                    continue
                if self.transform is not None:
                    if self.round_seed is not None:
                        seed_item(self.round_seed, self.seed_offset + position)
                    image = self.transform(image)
                yield image, self.samples[position][1]
            for key in sorted(set(wanted) - seen):  # listed, but the shard no longer holds it
                yield BadImage(f"{self.root / shard}{SHARD_SEPARATOR}{key}", "no longer in its shard")


def _shard_order(shard: str) -> tuple:
    folder, _, name = shard.rpartition("/")
    match = _SHARD.match(name)
    return (folder, int(match.group(1)) if match else -1, name)


def _extract_dir(root: Path, shard: str) -> Path:
    return _cache_root() / "wds-samples" / shard_digest(root / shard)[:40]


def _extracted_name(key: str, ext: str, data: bytes) -> str:
    """File name of an extracted sample: a digest of its key (a key from a tar may hold '/' or '..'), then the
    SHA-256 of its bytes (checked before every use, like the other caches' entries)."""
    return f"{_key_digest(key)}-{hashlib.sha256(data).hexdigest()[:32]}.{ext}"


def _key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


_EXTRACTED = re.compile(r"^([0-9a-f]{32})-([0-9a-f]{32})\.([a-z]+)$")


def _verified_extracts(folder: Path) -> dict[str, Path]:
    """{key digest: file} of the intact extracted samples in `folder`; a file whose bytes no longer match the
    SHA-256 in its name is removed (it is extracted again), with one warning."""
    found: dict[str, Path] = {}
    damaged = []
    names = sorted(os.listdir(folder)) if folder.is_dir() else []
    for name in names:
        match = _EXTRACTED.match(name)
        if not match or match.group(3) not in IMAGE_KEYS:
            continue
        path = folder / name
        try:
            intact = hashlib.sha256(path.read_bytes()).hexdigest()[:32] == match.group(2)
        except OSError:
            intact = False
        if intact:
            found[match.group(1)] = path
        else:
            damaged.append(path)
            path.unlink(missing_ok=True)
    if damaged:
        warnings.warn(f"{len(damaged)} extracted webdataset sample(s) under '{folder}' were damaged or replaced (their "
                      f"bytes do not match their SHA-256), e.g. '{damaged[0].name}'; extracting them again", stacklevel=3)
    return found


def _write_file_atomically(target: Path, data: bytes) -> None:
    """temp file + rename, by every process (not rank 0 alone, as clipconv.runtime.io's run outputs): under torchrun
    each rank needs the extracted files at once, and renames of identical bytes over each other are harmless."""

    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(tmp, new_file_mode())  # mkstemp makes 0600: give it the mode of any new file (the umask's)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def extract_samples(root: PathLike, paths: Sequence[str]) -> dict[str, Path]:
    """{shard sample path: file holding its image bytes}: samples not extracted yet (or whose extracted file is
    damaged) are read in one pass over their shards (webdataset) and written under
    `$CLIPCONV_CACHE/wds-samples/<shard SHA-256>/<key digest>-<bytes SHA-256>.<ext>`."""
    root = Path(root)
    files: dict[str, Path] = {}
    todo: dict[str, set[str]] = {}
    intact: dict[Path, dict[str, Path]] = {}
    for path in paths:
        shard, key = _split_ref(path)
        folder = _extract_dir(root, shard)
        if folder not in intact:
            intact[folder] = _verified_extracts(folder)
        existing = intact[folder].get(_key_digest(key))
        if existing is not None:
            files[path] = existing
        else:
            todo.setdefault(shard, set()).add(key)
    for shard in sorted(todo, key=_shard_order):
        folder = _extract_dir(root, shard)
        keys = todo[shard]
        for sample in _iterate(root / shard):
            key = sample["__key__"]
            if key not in keys:
                continue
            ext = _image_key(sample, root / shard)
            target = folder / _extracted_name(key, ext, sample[ext])
            folder.mkdir(parents=True, exist_ok=True)
            _write_file_atomically(target, sample[ext])
            files[f"{shard}{SHARD_SEPARATOR}{key}"] = target
            keys.discard(key)
        if keys:
            raise DataLayoutError(f"shard '{root / shard}' no longer holds sample(s) {sorted(keys)[:5]}; "
                                  "it changed since the split was drawn")
        if _extract_dir(root, shard) != folder:
            raise DataLayoutError(f"shard '{root / shard}' changed while its samples were extracted; run again")
    return files


def as_files(root: PathLike, samples: Sequence[Sample]) -> tuple[Path, list[Sample]]:
    """(root, samples) readable as image files: shard samples are extracted once (`extract_samples`) and
    given as absolute paths under root "/"; file samples come back unchanged. For code that opens
    `root / path` itself (e.g. a decoded-image cache)."""
    samples = [(str(p), int(label)) for p, label in samples]
    if not samples or not is_shard_sample(samples[0][0]):
        return Path(root), samples
    files = extract_samples(root, [p for p, _ in samples])
    return Path(os.sep), [(str(files[p]), label) for p, label in samples]


class ExtractedShardSamples(ImageListDataset):
    """Map-style `(image, label)` of shard samples, extracted once to files (K-shot training: shuffled,
    many epochs and augmentation rounds over a small part of large shards)."""

    def __init__(self, root: PathLike, samples: Sequence[Sample], transform: Optional[Callable] = None,
                 on_error: str = "skip", draft_size: Optional[int] = None) -> None:
        super().__init__(*as_files(root, samples), transform, on_error, draft_size)


def image_dataset(root: PathLike, samples: Sequence[Sample], transform: Optional[Callable] = None,
                  on_error: str = "skip", round_seed: Optional[int] = None,
                  draft_size: Optional[int] = None, seed_offset: int = 0) -> torch.utils.data.Dataset:
    """The dataset reading `samples` (paths relative to `root`): image files (`ImageListDataset`), or
    webdataset shard samples: streamed (`ShardStream`) for test splits, extracted once
    (`ExtractedShardSamples`) for train splits. `round_seed` / `seed_offset` are only applied by `ShardStream`
    (map-style datasets are seeded per item by their caller)."""
    samples = list(samples)
    if not samples or not is_shard_sample(samples[0][0]):
        return ImageListDataset(root, samples, transform, on_error=on_error, draft_size=draft_size)
    if any(_split_ref(p)[0].split("/")[-2:-1] == ["train"] for p, _ in samples):
        return ExtractedShardSamples(root, samples, transform, on_error, draft_size)
    return ShardStream(root, samples, transform, on_error, round_seed, draft_size, seed_offset)


# ------------------------------------------------------------------------------------------ classes
def subset_wnids(name: str) -> list[str]:
    """The 200 wnids of ImageNet-A or -R in label order (sorted; timm's lists, shipped in clipconv/assets)."""
    path = Path(__file__).resolve().parents[1] / "assets" / SUBSET_ASSETS[name]
    return path.read_text(encoding="utf-8").split()


def _read_names(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    names = [line for line in lines if line]
    if not names:
        raise DataLayoutError(f"'{path}' is empty; it should hold one class name per line (label order)")
    return names


def read_templates_file(path: PathLike) -> list[str]:
    """CLIP_benchmark's templates file (one per line, `{c}` for the class name) as our `{}` templates."""
    path = Path(path)
    templates = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        text = line.replace("{c}", "{}")
        rest = text.replace("{}", "", 1)
        if text.count("{}") != 1 or "{" in rest or "}" in rest:
            raise ValueError(f"{path}:{number}: a template must contain exactly one '{{c}}' (the class name), "
                             f"got {line!r}")
        templates.append(text)
    if not templates:
        raise ValueError(f"templates file '{path}' is empty")
    return templates


# ------------------------------------------------------------------------------------------- family
@register_family("wds")
class WdsFamily(DatasetFamily):
    """ImageNet and -V2/-Sketch/-A/-R as CLIP_benchmark's webdataset shards (see the module docstring)."""

    suite = tuple(WDS_FOLDERS)
    display = {name: EVAL_SET_SPECS[name].display_name for name in WDS_FOLDERS}
    benchmark_names = {name: "wds/" + folder[len("wds_"):] for name, folder in WDS_FOLDERS.items()}
    data_help = WDS_HELP
    verify_draws = False  # drawn samples are decoded when extracted; a bad one is skipped, not replaced
    selected_by_name = True  # --family wds

    def __init__(self, data_root: PathLike, classnames: Optional[PathLike] = None) -> None:
        if data_root is None:
            raise DataLayoutError(f"the wds family needs --data-root. {WDS_HELP}")
        super().__init__(Path(data_root).expanduser())
        if not self.data_root.is_dir():
            raise DataLayoutError(f"--data-root '{self.data_root}' does not exist or is not a folder. {WDS_HELP}")
        source = self.data_root / WDS_FOLDERS["imagenet"]
        if not source.is_dir():
            raise DataLayoutError(f"'{source}' does not exist. {WDS_HELP}")
        if classnames is not None and not Path(classnames).is_file():
            raise FileNotFoundError(f"--classnames file '{classnames}' does not exist")
        self.classnames = classnames
        self._universe: Optional[ClassList] = None

    @property
    def is_imagenet(self) -> bool:
        return len(self.universe()) == 1000 and self.universe().ids == tuple(w for w, _ in imagenet_classes())

    @property
    def published_label(self) -> str:  # type: ignore[override]
        """The paper's numbers apply when the shards hold the 1000 ImageNet classes (its set names are ImageNet's)."""
        return IMAGENET_PUBLISHED_LABEL if self.is_imagenet else ""

    def universe(self) -> ClassList:
        """Every class in label order (see the module docstring)."""
        if self._universe is None:
            file = self.data_root / WDS_FOLDERS["imagenet"] / CLASSNAMES_FILE
            if not file.is_file():
                raise DataLayoutError(f"'{file}' does not exist; CLIP_benchmark writes the class names there. {WDS_HELP}")
            names = _read_names(file)
            if self.classnames is not None:
                entries = load_classnames_file(self.classnames)
                if len(entries) != len(names):
                    raise DataLayoutError(f"--classnames '{self.classnames}' lists {len(entries)} classes but '{file}' "
                                          f"lists {len(names)}; the shards' labels index the latter")
                self._universe = ClassList([i for i, _ in entries], [n for _, n in entries], source=str(self.classnames))
            elif len(names) == 1000:
                canonical = imagenet_classes()
                self._universe = ClassList([w for w, _ in canonical], [n for _, n in canonical],
                                           source="prompts/imagenet_classnames.txt")
            else:
                ids = names if len(set(names)) == len(names) else [f"{i}:{n}" for i, n in enumerate(names)]
                self._universe = ClassList(ids, names, source=str(file))
        return self._universe

    def classes(self) -> ClassList:
        return self.universe()

    # ------------------------------------------------------------------ listing
    def _listing(self, folder: str, split: str) -> list[tuple[str, int]]:
        """[(sample path, label as stored)] of one split folder, in shard order."""
        listed = []
        for shard in shard_paths(self.data_root / folder / split):
            rel = f"{folder}/{split}/{shard.name}"
            listed.extend((f"{rel}{SHARD_SEPARATOR}{key}", label) for key, label in index_shard(shard))
        return listed

    def _label_map(self, name: str, classes: ClassList) -> tuple[list[Optional[int]], bool]:
        """(run label of each stored label, restricted) for one set."""
        universe = self.universe()
        folder = self.data_root / WDS_FOLDERS[name]
        file = folder / CLASSNAMES_FILE
        names = _read_names(file) if file.is_file() else None
        if name in SUBSET_ASSETS and self.is_imagenet:
            wnids = subset_wnids(name)
            if names is not None and len(names) != len(wnids):
                raise DataLayoutError(f"'{file}' lists {len(names)} classes; {self.display[name]} has {len(wnids)} "
                                      f"(timm's {SUBSET_ASSETS[name]})")
            ids = wnids
        elif names is None or names == list(universe.names) or len(names) == len(universe):
            ids = list(universe.ids)
        else:
            by_name: dict[str, list[str]] = {}
            for class_id, class_name in zip(universe.ids, universe.names):
                by_name.setdefault(class_name, []).append(class_id)
            unmatched = [n for n in names if len(by_name.get(n, [])) != 1]
            if unmatched:
                raise DataLayoutError(f"'{file}': class name(s) {unmatched[:5]} match no single class of "
                                      f"{universe.source}; give the set the source set's classnames.txt")
            ids = [by_name[n][0] for n in names]
        return [classes.index.get(class_id) for class_id in ids], len(ids) < len(universe)

    def train_samples(self, classes: ClassList) -> list[Sample]:
        mapping, _ = self._label_map("imagenet", classes)
        samples = self._map(self._listing(WDS_FOLDERS["imagenet"], "train"), mapping, "train")[0]
        if not samples:
            raise DataLayoutError(f"'{self.data_root / WDS_FOLDERS['imagenet'] / 'train'}' holds no sample of the run's classes")
        return samples

    def _map(self, listed: list[tuple[str, int]], mapping: list[Optional[int]], what: str) -> tuple[list[Sample], int]:
        out, dropped = [], 0
        for path, label in listed:
            if not 0 <= label < len(mapping):
                shard = self.data_root / path.partition(SHARD_SEPARATOR)[0]
                raise DataLayoutError(f"shard '{shard}': sample '{path.partition(SHARD_SEPARATOR)[2]}' has label {label}, "
                                      f"outside 0..{len(mapping) - 1} of its class list ({what})")
            run_label = mapping[label]
            if run_label is None:
                dropped += 1
            else:
                out.append((path, run_label))
        return out, dropped

    def eval_splits(self, names: Sequence[str], classes: ClassList) -> list[EvalSplit]:
        unknown = [name for name in names if name not in WDS_FOLDERS]
        if unknown:
            raise ValueError(f"unknown evaluation set(s) {unknown}; the wds family has {', '.join(self.suite)}")
        splits = []
        for name in names:
            folder = self.data_root / WDS_FOLDERS[name]
            if not folder.is_dir():
                warnings.warn(f"{self.display[name]} not found ('{folder}' does not exist); skipped", stacklevel=2)
                continue
            mapping, restricted = self._label_map(name, classes)
            samples, dropped = self._map(self._listing(WDS_FOLDERS[name], "test"), mapping, name)
            if not samples:
                warnings.warn(f"{self.display[name]}: '{folder / 'test'}' holds no sample of the run's classes; skipped",
                              stacklevel=2)
                continue
            subset = sorted({label for label in mapping if label is not None}) if restricted else None
            split = EvalSplit(name, self.display[name], folder / "test", samples, subset, dropped, len(classes))
            warn_few_classes(split)
            splits.append(split)
        return splits

    def dataset_templates(self) -> list[str]:
        """The source set's zeroshot_classification_templates.txt (CLIP_benchmark's templates)."""
        file = self.data_root / WDS_FOLDERS["imagenet"] / TEMPLATES_FILE
        if not file.is_file():
            raise FileNotFoundError(f"--templates dataset: '{file}' does not exist")
        return read_templates_file(file)

    def describe(self) -> JSONObject:
        return {**super().describe(), "classnames": None if self.classnames is None else str(self.classnames),
                "layout": "CLIP_benchmark webdataset"}
