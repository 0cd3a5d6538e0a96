"""Speed options of training, each checked for correctness on CPU: precision defaults, bf16 autocast, fused
AdamW, and --compile (torch.compile; the aot_eager backend traces the same forward and backward graphs)."""
from __future__ import annotations

import copy
import ctypes
import ctypes.util
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from clipconv import training as engine
from clipconv.adapters import add_adapters
from clipconv.app.bench_data import model_transforms, write_jpegs
from clipconv.data.decoded import decoded_images
from clipconv.data.sharded import SeededTrainItems
from clipconv.evaluation import ImageBatches, collect_logits, logits_of_batches
from clipconv.methods.finetune import loader_workers
from clipconv.runtime import memory
from clipconv.runtime.seeding import item_seed
from clipconv.training import TrainConfig, Trainer, build_optimizer, fused_adamw, resolve_precision

EPS = torch.finfo(torch.float32).eps
BF16_EPS = torch.finfo(torch.bfloat16).eps


def _tol(*tensors: torch.Tensor, eps: float = EPS, ulps: int = 256) -> float:
    return ulps * eps * max(float(t.detach().abs().max()) for t in tensors)


def _close(actual: torch.Tensor, expected: torch.Tensor, eps: float = EPS, ulps: int = 256) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=_tol(actual, expected, eps=eps, ulps=ulps))


class Classifier(nn.Module):
    """An adapted tiny encoder + linear head, the shape of what AdapterTuning trains."""

    def __init__(self, visual: nn.Module, classes: int = 3) -> None:
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(int(visual.output_dim), classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(images))


@pytest.fixture()
def classifier(tiny_backbone) -> Classifier:
    visual = tiny_backbone.visual
    modules = add_adapters(visual, "convpass", scale=0.5, dropout=0.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in modules.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    torch.manual_seed(0)
    return Classifier(visual)


def _batches(visual: nn.Module, count: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    return [(torch.randn(2, 3, *visual.image_size, generator=generator), torch.tensor([0, 2])) for _ in range(count)]


def _trained(model: nn.Module, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    batches = _batches(model.visual)
    Trainer.classifier(model, lambda generator: batches, len(batches), cfg, torch.device("cpu"), log=lambda *_: None).fit()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- precision
def test_auto_precision_is_fp32_on_cpu_and_explicit_values_are_kept():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"  # bf16 is 5–6× slower on this CPU
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert TrainConfig().precision == "fp32"


def test_bf16_autocast_training_forward_and_gradients_follow_fp32(classifier):
    images, labels = _batches(classifier.visual, 1)[0]
    classifier.train()

    def run(precision: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        trainer = Trainer.classifier(classifier, lambda g: [], 1, TrainConfig(precision=precision), torch.device("cpu"))
        with trainer._autocast():
            logits = classifier(images)
        params = [p for p in classifier.parameters() if p.requires_grad]
        return logits.float(), list(torch.autograd.grad(trainer.task.objective(logits, labels), params))

    full, full_grads = run("fp32")
    half, half_grads = run("bf16")
    assert half.dtype == torch.float32 and not torch.equal(half, full)  # autocast really ran in bf16
    # bf16 keeps 8 significant bits; two blocks, a head and the adapters: a few dozen bf16 ulps of the largest value
    _close(half, full, eps=BF16_EPS, ulps=32)
    for got, expected in zip(half_grads, full_grads):
        _close(got, expected, eps=BF16_EPS, ulps=32)


# ---------------------------------------------------------------- fused AdamW
def test_fused_adamw_only_when_every_parameter_is_a_cuda_float_tensor():
    cuda = SimpleNamespace(is_cuda=True, is_floating_point=lambda: True)
    cuda_int = SimpleNamespace(is_cuda=True, is_floating_point=lambda: False)
    assert fused_adamw([cuda, cuda]) is True
    assert fused_adamw([cuda, cuda_int]) is None
    assert fused_adamw([cuda, nn.Parameter(torch.zeros(2))]) is None  # one CPU tensor: torch's default
    assert fused_adamw([]) is None
    optimizer = build_optimizer([nn.Parameter(torch.zeros(2))], TrainConfig())
    assert optimizer.defaults["fused"] is None  # CPU: the default foreach implementation
    grouped = build_optimizer([nn.Parameter(torch.zeros(2))], TrainConfig(lr_scales=(("head.", 0.1),)), ["head.w"])
    assert grouped.defaults["fused"] is None


def test_fused_adamw_steps_equal_the_default_ones():
    """The fused kernel (CPU here, CUDA in use) computes the same AdamW update as the default implementation."""
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(5, 7, generator=generator), torch.randn(7, generator=generator)]
    grads = [[torch.randn(t.shape, generator=generator) for t in start] for _ in range(4)]
    results = []
    for fused in (None, True):
        params = [nn.Parameter(t.clone()) for t in start]
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=fused)
        for step in grads:
            for param, grad in zip(params, step):
                param.grad = grad.clone()
            optimizer.step()
        results.append([p.detach() for p in params])
    for default, fused, initial in zip(*results, start):
        assert not torch.equal(default, initial)  # the steps moved the parameters
        _close(fused, default)


# ---------------------------------------------------------------- torch.compile
def _compiled_or_skip(module: nn.Module, backend: str):
    try:
        compiled = engine.compile_module(module, backend)
        return compiled
    except Exception as error:  # pragma: no cover - platform without dynamo
        pytest.skip(f"torch.compile unavailable here: {error}")


@pytest.mark.slow  # torch.compile's inductor builds C++ kernels: ~10 s idle, ~35 s busy
def test_compiled_classifier_equals_the_uncompiled_one_outputs_and_gradients(classifier):
    images, labels = _batches(classifier.visual, 1)[0]
    classifier.train()
    compiled = _compiled_or_skip(classifier, "aot_eager")
    params = [p for p in classifier.parameters() if p.requires_grad]

    def run(model) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits = model(images)
        return logits, list(torch.autograd.grad(nn.functional.cross_entropy(logits, labels), params))

    try:
        got, got_grads = run(compiled)
    except Exception as error:  # pragma: no cover
        pytest.skip(f"torch.compile cannot trace here: {error}")
    expected, expected_grads = run(classifier)
    _close(got, expected)
    for got_grad, expected_grad in zip(got_grads, expected_grads):
        _close(got_grad, expected_grad)


def test_trainer_with_compile_trains_the_same_weights(classifier, monkeypatch):
    monkeypatch.setattr(engine, "COMPILE_BACKEND", "aot_eager")
    twin = copy.deepcopy(classifier)
    initial = {n: p.detach().clone() for n, p in classifier.named_parameters() if p.requires_grad}
    plain = _trained(classifier, TrainConfig(epochs=1, lr=1e-2, seed=4))
    compiled = _trained(twin, TrainConfig(epochs=1, lr=1e-2, seed=4, compile=True))
    assert plain.keys() == compiled.keys() == initial.keys()
    for name in plain:
        assert not torch.equal(compiled[name], initial[name])  # the compiled run trained every tensor
        _close(compiled[name], plain[name])


def test_compile_option_reaches_the_trainer_and_is_a_cli_flag():
    from clipconv.methods import build_method

    method = build_method("convpass", compile=True)
    assert method.config.compile is True
    ctx = SimpleNamespace(seed=1, workers=0)
    assert method.config.train_config(ctx).compile is True
    assert build_method("convpass").config.train_config(ctx).compile is False

    from clipconv.app.cli.options import given
    from clipconv.app.cli.train import METHOD_PREFIX, build_parser

    args = build_parser("convpass").parse_args(["--compile"])
    assert given(args, args._method_fields, METHOD_PREFIX) == {"compile": True}


def test_training_forward_is_the_model_or_one_compiled_wrapper_per_model_object(monkeypatch):
    monkeypatch.setattr(engine, "COMPILE_BACKEND", "eager")
    model = nn.Linear(3, 2)
    plain = Trainer.classifier(model, lambda g: [], 1, TrainConfig(), torch.device("cpu"))
    assert plain.training_forward() is model
    trainer = Trainer.classifier(model, lambda g: [], 1, TrainConfig(compile=True), torch.device("cpu"))
    compiled = trainer.training_forward()
    assert compiled is not model and trainer.training_forward() is compiled
    trainer.forward_model = nn.Sequential(model)  # e.g. wrapped after construction (DistributedDataParallel)
    assert trainer.training_forward() is not compiled


class _RandomItems(torch.utils.data.Dataset):
    """Items drawn from torch's global CPU generator, the way random train transforms draw."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.rand(4), index


def test_seeded_train_items_draw_what_torch_manual_seed_gives_and_leave_device_generators_alone(monkeypatch):
    """The per-item seeding seeds the CPU generator only (torch.manual_seed also queues a seed for every
    CUDA/XPU device, formatting a stack trace per item): the augmentation stays the one of
    `torch.manual_seed(item_seed(...))`, and no device seeding runs."""
    expected = []
    for index in range(6):
        torch.manual_seed(item_seed(7, index))
        expected.append(torch.rand(4))
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    items = SeededTrainItems(_RandomItems(), round_seed=7)
    for index in (3, 0, 5, 1, 4, 2):
        assert torch.equal(items[(index, False)][0], expected[index])
    assert calls == []


class _CountingTransform:
    """A deterministic transform that counts its calls."""

    def __init__(self, transform) -> None:
        self.transform, self.calls = transform, 0

    def __call__(self, image):
        self.calls += 1
        return self.transform(image)


@pytest.mark.parametrize("in_memory", [False, True])
def test_validation_batches_are_transformed_once_and_score_as_collect_logits(tmp_path, in_memory):
    root = tmp_path / "images"
    samples = write_jpegs(root, 10, (40, 52), seed=3)
    _, evaluation = model_transforms(32)
    decoded = decoded_images(root, samples, None) if in_memory else None
    counting = _CountingTransform(evaluation)
    batches = ImageBatches(root, samples, counting, 4, decoded=decoded)
    score = lambda images: images.flatten(1)[:, :7] * 3.0  # noqa: E731
    expected, expected_labels = collect_logits(score, root, samples, evaluation, torch.device("cpu"), 4,
                                               decoded=decoded)
    for _ in range(3):  # every epoch's validation
        logits, labels = logits_of_batches(score, batches, torch.device("cpu"))
        assert torch.equal(logits, expected) and torch.equal(labels, expected_labels)
    assert counting.calls == len(samples)  # decoded and transformed once, not once per epoch


def test_validation_batches_over_the_budget_are_loaded_again_every_time(tmp_path):
    root = tmp_path / "images"
    samples = write_jpegs(root, 6, (40, 40), seed=4)
    _, evaluation = model_transforms(32)
    counting = _CountingTransform(evaluation)
    batches = ImageBatches(root, samples, counting, 4, budget_bytes=4 * 3 * 32 * 32 * 4 - 1)  # < one batch
    first = [images for images, _ in batches]
    second = [images for images, _ in batches]
    assert all(torch.equal(a, b) for a, b in zip(first, second)) and counting.calls == 2 * len(samples)


def test_in_memory_images_load_in_the_main_process_on_cpu_only():
    ctx = SimpleNamespace(device="cpu", workers=2)
    assert loader_workers(ctx, decoded=object()) == 0  # the new default: no worker processes on a CPU device
    assert loader_workers(ctx, decoded=None) == 2  # files to decode: the --workers asked for
    assert loader_workers(SimpleNamespace(device="cuda", workers=2), decoded=object()) == 2


def test_trainer_on_cpu_keeps_freed_memory_for_the_next_step(monkeypatch, classifier):
    calls = []
    monkeypatch.setattr(engine, "retain_freed_memory", lambda: calls.append(True) or True)
    batches = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))]
    Trainer.classifier(classifier, lambda generator: batches, 1, TrainConfig(epochs=1), torch.device("cpu"), log=str)
    assert calls == [True]


def test_retain_freed_memory_respects_the_users_malloc_environment(monkeypatch):
    monkeypatch.setattr(memory, "_applied", [])
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    assert memory.retain_freed_memory() is False
    monkeypatch.setattr(memory, "_applied", [])
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    expected = ctypes.util.find_library("c") is not None and hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallopt")
    assert memory.retain_freed_memory() is expected
