"""ToTensor + Normalize once per batch (clipconv.data.tensorize): the batches equal those of the per-image
transform bit for bit, for the training augmentation (seeded), validation/evaluation and decoded images."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from open_clip.transform import PreprocessCfg
from PIL import Image
from torchvision import transforms as T

from clipconv.app.bench_data import model_transforms, write_jpegs
from clipconv.backbone import protocol_train_transform
from clipconv.data import ImageListDataset, SkipTracker, collate_skip_bad
from clipconv.data.decoded import decoded_images
from clipconv.data.draft import leading_resize
from clipconv.data.folder import BadImage
from clipconv.data.sharded import train_loader
from clipconv.data.tensorize import CollateTail, split_transform
from clipconv.evaluation import image_loader


def _images() -> list[Image.Image]:
    """Random pixels (every byte value occurs) at odd sizes, and the modes the RGB conversion meets."""
    rng = np.random.default_rng(7)
    rgb = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
           [(37, 91), (64, 64), (201, 150), (49, 48), (33, 35)]]
    rgba = Image.fromarray(rng.integers(0, 256, (45, 61, 4), dtype=np.uint8), "RGBA")
    grey = Image.fromarray(rng.integers(0, 256, (70, 41), dtype=np.uint8), "L")
    return rgb + [rgba, grey, rgb[1].convert("P"), rgb[2].convert("CMYK"), grey.convert("1")]


def _transforms() -> dict[str, T.Compose]:
    train, evaluation = model_transforms(32)
    return {"train": train, "eval": evaluation,
            "train_crop": protocol_train_transform(PreprocessCfg(size=24, mean=(0.1, 0.7, 0.3), std=(0.9, 0.2, 0.5)),
                                                   scale=(0.5, 1.0))}


@pytest.mark.parametrize("name", ["train", "eval", "train_crop"])
def test_split_batches_equal_the_per_image_transform(name):
    transform = _transforms()[name]
    item, collate = split_transform(transform)
    images = _images()
    torch.manual_seed(3)
    reference = torch.stack([transform(image) for image in images])
    torch.manual_seed(3)  # the same augmentation draws
    items = [(item(image), index) for index, image in enumerate(images)]
    assert all(pixels.dtype == torch.uint8 for pixels, _ in items)  # the per-item part stops at the pixels
    batch = collate(items)
    assert batch[0].dtype == reference.dtype and torch.equal(batch[0], reference)
    assert torch.equal(batch[1], torch.arange(len(images)))


def test_mean_and_std_come_from_the_transforms_own_normalize():
    transform = _transforms()["train_crop"]
    _, collate = split_transform(transform)
    assert isinstance(collate, CollateTail) and collate.normalize is transform.transforms[-1]
    ones = collate([(torch.full((3, 2, 2), 255, dtype=torch.uint8), 0)])[0]
    assert torch.equal(ones[0, :, 0, 0], (1 - torch.tensor([0.1, 0.7, 0.3])) / torch.tensor([0.9, 0.2, 0.5]))


def test_inputs_the_split_cannot_serve_are_finished_per_item_in_a_mixed_batch():
    from open_clip.transform import MaybeToTensor

    transform = T.Compose([T.CenterCrop(5), MaybeToTensor(), T.Normalize([0.5], [0.25])])  # no RGB conversion
    item, collate = split_transform(transform)
    rng = np.random.default_rng(1)
    grey = Image.fromarray(rng.integers(0, 256, (9, 7), dtype=np.uint8), "L")
    inputs = [grey, grey.convert("1"), grey.convert("F"), torch.rand(1, 5, 5), grey.rotate(90, expand=True)]
    items = [(item(x), i) for i, x in enumerate(inputs)]
    assert [pixels.dtype for pixels, _ in items] == [torch.uint8, torch.float32, torch.float32, torch.float32,
                                                     torch.uint8]
    batch = collate(items[:2] + [BadImage("gone.jpg", "undecodable")] + items[2:])
    assert torch.equal(batch[0], torch.stack([transform(x) for x in inputs])) and batch.skipped == ("gone.jpg",)


@pytest.mark.parametrize("transform", [
    T.Compose([T.ToTensor()]),
    T.Compose([T.Normalize([0.5], [0.5])]),
    T.Compose([T.ToTensor(), T.Normalize([0.5], [0.5]), T.RandomErasing()]),  # not the last steps
    T.Compose([T.PILToTensor(), T.Normalize([0.5], [0.5])]),
    T.Compose([T.ToTensor(), type("MyNormalize", (T.Normalize,), {})([0.5], [0.5])]),  # may normalize otherwise
    lambda image: image,
    None,
])
def test_other_transforms_keep_the_per_item_path(transform):
    assert split_transform(transform) == (transform, collate_skip_bad)


@pytest.fixture()
def jpeg_tree(tmp_path):
    root = tmp_path / "images"
    samples = write_jpegs(root, 9, (45, 37), seed=5)
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (31, 53, 4), dtype=np.uint8), "RGBA").save(
        root / "c1" / "alpha.png")
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 29), dtype=np.uint8), "L").save(
        root / "c0" / "grey.png")
    (root / "c0" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root, samples[:4] + [("c0/broken.jpg", 0), ("c1/alpha.png", 1), ("c0/grey.png", 0)] + samples[4:]


def _drain(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    with pytest.warns(UserWarning, match="skipped 1 undecodable"):
        return [(images.clone(), labels.clone()) for images, labels in loader]


def _assert_same(got, reference) -> None:
    assert len(got) == len(reference) > 1
    for (a, la), (b, lb) in zip(got, reference):
        assert a.dtype == b.dtype and torch.equal(a, b) and torch.equal(la, lb)


@pytest.mark.parametrize("workers", [0, 1])
def test_training_loader_batches_equal_the_per_image_transform(jpeg_tree, workers):
    root, samples = jpeg_tree
    transform = _transforms()["train"]
    item, collate = split_transform(transform)

    def batches(dataset, collate_fn):
        return _drain(train_loader(dataset, 4, workers, torch.Generator().manual_seed(11), collate=collate_fn))

    reference = batches(ImageListDataset(root, samples, transform), collate_skip_bad)
    _assert_same(batches(ImageListDataset(root, samples, item), collate), reference)


@pytest.mark.parametrize("decoded", [False, True])
def test_evaluation_batches_equal_the_per_image_transform(jpeg_tree, decoded):
    root, samples = jpeg_tree
    transform = _transforms()["eval"]
    images = decoded_images(root, samples, None, prepare=leading_resize(transform)) if decoded else None
    reference = _drain(SkipTracker(torch.utils.data.DataLoader(ImageListDataset(root, samples, transform), batch_size=4,
                                                               collate_fn=collate_skip_bad)))
    _assert_same(_drain(image_loader(root, samples, transform, 4, 0, decoded=images)), reference)

