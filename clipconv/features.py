"""On-disk cache of frozen image-encoder features, so each image set is encoded once per backbone.

A cache entry is keyed by everything that changes the features: the backbone (`Backbone.describe()`:
model, weights id incl. file hash, QuickGELU) and its precision, the dataset (root + hash of the sorted
sample list), the transform (an explicit id or its repr without memory addresses), the number of
augmentation rounds and the seed. Entries are safetensors files written atomically (temp file + rename),
so an interrupted run never leaves a readable partial entry. Each entry stores the SHA-256 of its tensors;
an entry whose stored key differs, that fails to load or whose bytes no longer match the checksum is
recomputed and rewritten (with a warning naming it). A cache folder that cannot be written (a file, a
read-only folder) turns the cache off with one warning saying how to fix it.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import open_clip
import torch
from safetensors import safe_open

from clipconv.backbone import Backbone
from clipconv.data import image_dataset, report_skipped
from clipconv.data.draft import draft_for
from clipconv.data.tensorize import split_transform
from clipconv.runtime import ranks
from clipconv.runtime.cache import cache_dir_problem, cache_root, tensor_checksum, transform_id, write_cache_entry
from clipconv.runtime.progress import progress
from clipconv.runtime.seeding import seed_item

__all__ = ["FeatureStore", "default_cache_dir", "samples_digest", "ENTRY_SUFFIX"]

CACHE_FORMAT = 3  # 2: per-item augmentation seeding; 3: SHA-256 of the tensors in the metadata
ENTRY_SUFFIX = ".safetensors"
_TENSORS = ("features", "labels", "kept")
_warned_dirs: set[str] = set()  # unusable cache folders already reported in this process


def default_cache_dir() -> Path:
    """`$CLIPCONV_CACHE/features`, else `~/.cache/clipconv/features`."""
    return cache_root() / "features"


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    return tensor_checksum(tensors, _TENSORS)


def samples_digest(samples: Sequence[tuple[str, int]]) -> str:
    """SHA-256 over the sorted (relative path, label) list."""
    digest = hashlib.sha256()
    for path, label in sorted((str(p), int(l)) for p, l in samples):
        digest.update(f"{path}\t{label}\n".encode("utf-8"))
    return digest.hexdigest()


class _SeededItems(torch.utils.data.Dataset):
    """Seeds torch's RNG per item, so random augmentations depend only on (round seed, item index)."""

    def __init__(self, dataset: torch.utils.data.Dataset, round_seed: int) -> None:
        self.dataset, self.round_seed = dataset, round_seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        seed_item(self.round_seed, index)
        return self.dataset[index]


class FeatureStore:
    """Raw (unnormalized) fp32 `encode_image` features of image lists, cached on disk.

    `cache_dir=None` disables the cache. `encoder_calls` counts the images pushed through the encoder
    (so a test can assert that a second method encoded nothing). Undecodable images are skipped; the
    returned labels (and `last_kept`, the positions in the given sample list that were kept) stay aligned
    with the features, which come back in the order of the given sample list.
    Images are fed in the dtype of the backbone's weights (load it with precision="bf16"/"fp16" for a
    cast model); no autocast is used, since autocast over frozen weights re-casts them on every call
    (about 10× slower on CPU, see CALIBRATION.md).
    """

    def __init__(
        self,
        backbone: Backbone,
        cache_dir: Union[str, Path, None] = "default",
        batch_size: int = 64,
        workers: int = 0,
        device: Union[str, torch.device, None] = None,
        draft: str = "off",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"FeatureStore batch_size must be >= 1, got {batch_size}")
        self.backbone = backbone
        self.cache_dir = default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)
        self._cache_checked = False  # the folder is probed (and created) on first use, not here
        self.batch_size = batch_size
        self.workers = workers
        self.draft = draft  # reduced-size JPEG decoding (clipconv.data.draft): "eval", "all" or "off"
        self._draft_size: Optional[int] = None
        self.device = torch.device(device) if device is not None else backbone.device
        self.encoder_calls = 0
        self.cache_hits = 0
        self.last_kept = torch.empty(0, dtype=torch.long)

    # ------------------------------------------------------------------ keys
    def cache_key(self, root: Union[str, Path], samples: Sequence, transform_name: str, rounds: int, seed: int) -> dict:
        """Everything that identifies one feature set."""
        return {
            "format": CACHE_FORMAT,
            "backbone": self.backbone.describe(),
            "architecture": self._architecture(),
            "precision": getattr(self.backbone, "precision", "fp32"),
            "root": str(Path(root).resolve()),
            "samples": samples_digest(samples),
            "n_samples": len(samples),
            "transform": transform_name,
            "rounds": int(rounds),
            "seed": int(seed),
        }

    def _architecture(self) -> str:
        """Digest of the model config, plus of the image-tower weights when they are a random init
        (whose weights id says nothing about the actual numbers)."""
        if getattr(self, "_architecture_id", None) is None:

            digest = hashlib.sha256(json.dumps(open_clip.get_model_config(self.backbone.model_name),
                                               sort_keys=True, default=str).encode("utf-8"))
            if str(self.backbone.describe().get("weights_id", "")).startswith("random-init"):
                for name, tensor in self.backbone.model.visual.state_dict().items():
                    digest.update(name.encode("utf-8"))
                    digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
            self._architecture_id = digest.hexdigest()
        return self._architecture_id

    def _entry_path(self, key: dict) -> Optional[Path]:
        if self._usable_cache_dir() is None:
            return None
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()
        return self.cache_dir / f"{digest[:40]}{ENTRY_SUFFIX}"

    def _usable_cache_dir(self) -> Optional[Path]:
        """The cache folder, created on first use; None (after one warning) when it cannot be used."""
        if self.cache_dir is not None and not self._cache_checked:
            self._cache_checked = True
            problem = cache_dir_problem(self.cache_dir)
            if problem is not None:
                self._disable_cache(problem)
        return self.cache_dir

    def _disable_cache(self, problem: str) -> None:
        """Run uncached from now on, with one warning per folder and process saying how to fix it."""
        folder, self.cache_dir = str(self.cache_dir), None
        if folder not in _warned_dirs:
            _warned_dirs.add(folder)
            warnings.warn(f"feature cache '{folder}' is not usable: {problem}; running without the cache "
                          "(point CLIPCONV_CACHE at a writable folder, or pass --no-cache)", stacklevel=5)

    # ------------------------------------------------------------------ public
    def encode(
        self,
        root: Union[str, Path],
        samples: Sequence[tuple[str, int]],
        transform: Union[str, Callable] = "eval",
        rounds: int = 1,
        seed: int = 0,
        desc: str = "",
        with_labels: bool = False,
        transform_name: Optional[str] = None,
        since: Optional[float] = None,
    ):
        """Features (N, D) fp32 [and labels (N,)] of `samples` under `transform`.

        `transform` is "eval", "train" (the backbone's transforms) or any callable; `transform_name`
        overrides the id used in the cache key. With `rounds > 1` the features of `rounds` augmented
        passes are averaged (Tip-Adapter's cache keys); in round r item i (of the sorted sample list) is
        transformed right after seeding the CPU generator with `item_seed(seed * 1000 + r, i)`, so the result does not
        depend on the number of workers or the batch size. Images that vanished (or, given `since`, when the
        samples were listed, changed after it) raise ImagesChangedError and nothing is cached.
        """
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        samples = [(str(p), int(l)) for p, l in samples]
        order = sorted(range(len(samples)), key=lambda i: samples[i])
        samples = [samples[i] for i in order]  # cached in sorted order, returned in the caller's
        func = self._resolve_transform(transform)
        name = transform_name or (f"backbone.{transform}:" + transform_id(func) if isinstance(transform, str)
                                  else transform_id(func))

        self._draft_size = draft_for(self.draft, func, training=not (isinstance(transform, str) and transform == "eval"))
        if self._draft_size is not None:  # drafted features differ slightly: their own cache entries
            name += f"|draft>={self._draft_size}"
        key = self.cache_key(root, samples, name, rounds, seed)
        # under torchrun rank 0 alone looks at the cache and sends the entry (or its absence) to the others
        path = ranks.on_main(lambda: self._entry_path(key))
        cached = ranks.on_main(lambda: self._read(path, key)) if path is not None else None
        if cached is not None:
            self.cache_hits += 1
            feats, labels, kept = cached
        else:
            feats, labels, kept = self._compute(root, samples, func, rounds, seed, desc, since)
            if path is not None and ranks.is_main():
                self._write(path, key, feats, labels, kept)
        original = torch.as_tensor(order, dtype=torch.long)[kept] if len(kept) else kept
        back = torch.argsort(original)
        feats, labels, kept = feats[back], labels[back], original[back]
        self.last_kept = kept
        return (feats, labels) if with_labels else feats

    # ------------------------------------------------------------------ internals
    def _resolve_transform(self, transform: Union[str, Callable]) -> Callable:
        if transform == "eval":
            return self.backbone.eval_transform
        if transform == "train":
            return self.backbone.train_transform
        if isinstance(transform, str) or not callable(transform):
            raise ValueError(f"transform must be 'eval', 'train' or a callable, got {transform!r}")
        return transform

    def _read(self, path: Path, key: dict):
        if not path.is_file():
            return None

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                stored = json.loads(metadata.get("key", "null"))
                if stored != json.loads(json.dumps(key)):
                    return None
                tensors = {name: handle.get_tensor(name) for name in _TENSORS}
        except Exception as err:  # a damaged entry is recomputed, never trusted
            warnings.warn(f"feature cache entry '{path}' is unreadable ({err}); recomputing it", stacklevel=3)
            return None
        if metadata.get("sha256") != _checksum(tensors):
            warnings.warn(f"feature cache entry '{path}' is damaged (its bytes do not match the stored SHA-256); "
                          "recomputing it", stacklevel=3)
            return None
        return tensors["features"], tensors["labels"], tensors["kept"]

    def _write(self, path: Path, key: dict, feats: torch.Tensor, labels: torch.Tensor, kept: torch.Tensor) -> None:
        tensors = {"features": feats.contiguous(), "labels": labels.contiguous(), "kept": kept.contiguous()}
        write_cache_entry(path, tensors, {"key": json.dumps(key), "sha256": _checksum(tensors)},
                          "feature cache entry")

    @torch.no_grad()
    def _compute(self, root, samples, transform, rounds, seed, desc, since=None):
        total = None
        labels = kept = None
        for round_index in range(rounds):
            generator_seed = seed * 1000 + round_index
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(generator_seed)
                feats, round_labels, round_kept = self._encode_once(
                    root, samples, transform, generator_seed,
                    desc if rounds == 1 else f"{desc or 'features'} (round {round_index + 1}/{rounds})", since)
            if labels is None:
                labels, kept, total = round_labels, round_kept, feats
            else:
                if not torch.equal(kept, round_kept):
                    raise RuntimeError(f"images under '{root}' changed between augmentation rounds")
                total = total + feats
        return (total / rounds).float().contiguous(), labels, kept

    def _encode_once(self, root, samples, transform, generator_seed, desc, since=None):

        # the "label" carried through the loader is the sample's position, so skipped files are known exactly
        indexed = [(path, position) for position, (path, _) in enumerate(samples)]
        if ranks.is_distributed():  # this rank's run of whole batches, seeded by the items' global positions
            start, end = ranks.batch_shard_bounds(len(indexed), self.batch_size)
        else:
            start, end = 0, len(indexed)
        item_transform, collate = split_transform(transform)  # ToTensor + Normalize once per batch
        shard = indexed if start == 0 and end == len(indexed) else indexed[start:end]
        dataset = image_dataset(root, shard, item_transform, on_error="skip", round_seed=generator_seed,
                                draft_size=self._draft_size, seed_offset=start)
        if not isinstance(dataset, torch.utils.data.IterableDataset):  # streamed shards seed each item themselves
            if (start, end) != (0, len(indexed)):  # seeds from the global positions
                dataset = image_dataset(root, indexed, item_transform, on_error="skip", draft_size=self._draft_size)
                dataset = torch.utils.data.Subset(_SeededItems(dataset, generator_seed), range(start, end))
            else:
                dataset = _SeededItems(dataset, generator_seed)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.workers,
            collate_fn=collate, generator=torch.Generator().manual_seed(generator_seed),
            pin_memory=self.device.type == "cuda",
        )
        model = self.backbone.model
        dtype = next(model.visual.parameters()).dtype
        feats, positions, skipped = [], [], []
        for batch in progress(loader, desc=desc or "features", unit="batch"):
            skipped.extend(getattr(batch, "skipped", ()))
            images, index = batch
            if len(index) == 0:
                continue
            out = model.encode_image(images.to(self.device, dtype=dtype, non_blocking=True))
            feats.append(out.float().cpu())
            positions.append(index)
        skipped = [path for part in ranks.gather_objects(skipped) for path in part]
        if skipped:

            report_skipped(skipped, f"images under '{root}'", since)
        kept = torch.cat(positions) if positions else torch.empty(0, dtype=torch.long)
        width = int(getattr(model.visual, "output_dim", 0) or 0)
        features = torch.cat(feats) if feats else torch.empty(0, width)
        features, kept = ranks.gather_rows(features, kept)  # in sample order on every rank
        self.encoder_calls += len(kept)
        all_labels = torch.tensor([samples[i][1] for i in kept.tolist()], dtype=torch.long)
        return features, all_labels, kept
