"""The one training loop (clipconv.training.Trainer): every trained method resumes bit-identically after a
kill, a non-finite loss stops every task kind, fp16 trains through a GradScaler, the single-process step is
exactly mean cross-entropy, and `.backward(` lives in the trainer (and the speed benchmark) only."""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from baseline_world import make_world
from tiny_tasks import Killed, LinearTask, fixed_batches, stopped_after_saving
from torch import nn

import clipconv
from clipconv.methods.base import build_method
from clipconv.methods.clip_lora import ClipLoRA
from clipconv.training import STATE_FILE, TrainConfig, Trainer, TrainingDivergedError


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_config):
    return make_world(tmp_path_factory.mktemp("trainer"), tiny_config, shots=3, val_shots=1, classes=3)


#: (method, options, epoch after which the run is killed); every run has >= 2 epochs after the kill
RESUMABLE = [
    ("convpass", {"epochs": 3, "batch_size": 4, "lr": 1e-2, "scales": [1.0]}, 1),
    ("clip_lora", {"iters_per_shot": 3, "batch_size": 4, "lr": 1e-2}, 1),  # 9 steps, 3 epochs; dropout 0.25
    ("coop", {"epochs": 4, "batch_size": 4, "n_ctx": 2, "views": 2, "lr": 0.05}, 2),
    ("cocoop", {"epochs": 3, "batch_size": 2, "views": 2, "lr": 0.05}, 1),
    ("tip_adapter_f", {"epochs": 3, "batch_size": 4, "augment_rounds": 1, "search": "small", "lr": 1e-2}, 1),
]


def _trained(method) -> dict[str, torch.Tensor]:
    return method.interpolation_endpoints()[1]


def _history(method, result: dict) -> list[dict]:
    """The epoch records of a fit (adapter tuning keeps them per scale in its result)."""
    return result["runs"][0]["history"] if "runs" in result else method.history


def _untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


@pytest.mark.parametrize("name, options, kill_after", RESUMABLE, ids=[r[0] for r in RESUMABLE])
def test_killed_run_resumes_to_bit_identical_weights(world, tmp_path, name, options, kill_after):
    straight = build_method(name, **options)
    straight_history = _history(straight, straight.fit(dataclasses.replace(world.ctx, output_dir=tmp_path / "straight")))

    out = tmp_path / "killed"
    with stopped_after_saving(kill_after), pytest.raises(Killed):
        build_method(name, **options).fit(dataclasses.replace(world.ctx, output_dir=out))
    assert torch.load(out / STATE_FILE, weights_only=True)["epoch"] == kill_after
    torch.manual_seed(12345)  # a resumed process starts from another RNG state: the train state restores it

    resumed = build_method(name, **options)
    resumed_history = _history(resumed, resumed.fit(dataclasses.replace(world.ctx, output_dir=out, resume=True)))
    a, b = _trained(straight), _trained(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert len(resumed_history) > kill_after + 1  # the resumed run trained the epochs after the kill
    assert _untimed(resumed_history) == _untimed(straight_history)


@pytest.mark.parametrize("name, options, poison", [
    ("coop", {"epochs": 1, "n_ctx": 2, "views": 0}, {"init_std": float("nan")}),
    ("cocoop", {"epochs": 1, "views": 0, "batch_size": 3, "init_phrase": None, "n_ctx": 2}, {"init_std": float("nan")}),
    ("tip_adapter_f", {"epochs": 1, "augment_rounds": 1, "search": "none"}, {"alpha": float("nan")}),
    ("convpass", {"epochs": 1, "batch_size": 4, "lr": 1e30, "scales": [1.0]}, {}),
], ids=["coop", "cocoop", "tip_adapter_f", "convpass"])
def test_non_finite_loss_stops_every_task_kind(world, tmp_path, name, options, poison):
    method = build_method(name, **options)
    for option, value in poison.items():  # set behind the config's checks (which refuse a NaN option)
        setattr(method.config, option, value)
        if hasattr(method, option):  # read from the config when the method was built (Tip-Adapter's alpha)
            setattr(method, option, value)
    with pytest.raises(TrainingDivergedError, match=r"non-finite loss .* at epoch 1, step \d+, lr"):
        method.fit(dataclasses.replace(world.ctx, output_dir=tmp_path))
    assert not (tmp_path / STATE_FILE).exists()


def test_non_finite_loss_stops_clip_lora(world, tmp_path):
    method = build_method("clip_lora", iters_per_shot=1, batch_size=4)
    method.build(world.ctx)
    method.logit_scale = float("nan")
    with pytest.raises(TrainingDivergedError, match=r"non-finite loss .* at epoch 1, step 1, lr"):
        method.fit(dataclasses.replace(world.ctx, output_dir=tmp_path))
    assert not (tmp_path / STATE_FILE).exists()


# ---------------------------------------------------------------- fp16 and the grad scaler
def test_fp16_trains_through_a_grad_scaler(monkeypatch):
    trainer = Trainer(LinearTask(fixed_batches()), TrainConfig(epochs=1, lr=1e-2, precision="fp16"), torch.device("cpu"),
                      log=lambda *_: None)
    assert isinstance(trainer.scaler, torch.amp.GradScaler)
    scaled, stepped = [], []
    scale, step = trainer.scaler.scale, trainer.scaler.step
    monkeypatch.setattr(trainer.scaler, "scale", lambda loss: scaled.append(loss) or scale(loss))
    monkeypatch.setattr(trainer.scaler, "step", lambda optimizer: stepped.append(optimizer) or step(optimizer))
    before = {n: p.detach().clone() for n, p in trainer.task.trainable().items()}
    trainer.fit()
    assert len(scaled) == len(stepped) == 2 and all(o is trainer.optimizer for o in stepped)
    assert any(not torch.equal(p, before[n]) for n, p in trainer.task.trainable().items())
    assert trainer.state_dict()["scaler"] is not None  # resumable
    for precision in ("fp32", "bf16"):
        plain = Trainer(LinearTask(fixed_batches()), TrainConfig(precision=precision), torch.device("cpu"))
        assert plain.scaler is None


def test_clip_lora_fp16_gets_the_grad_scaler(world):
    method = build_method("clip_lora", precision="fp16", iters_per_shot=1)
    assert isinstance(method, ClipLoRA)
    assert method.train_config(world.ctx, shots=3).precision == "fp16"
    assert method.train_config(world.ctx, shots=3).steps == 3


def test_one_process_step_is_exactly_mean_cross_entropy():
    """total · 1 / count in one process is bit for bit mean cross-entropy: the same AdamW step as before."""
    batches = fixed_batches(1)
    trainer = Trainer(LinearTask(batches), TrainConfig(epochs=1, lr=1e-2), torch.device("cpu"), log=lambda *_: None)
    torch.manual_seed(0)
    reference = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    loss = F.cross_entropy(reference(batches[0][0]), batches[0][1])
    loss.backward()
    optimizer.step()
    trainer.fit()
    for (name, got), expected in zip(trainer.task.trainable().items(), reference.parameters()):
        assert torch.equal(got, expected), name
    assert trainer.history[0]["loss"] == loss.item()


def test_per_epoch_schedule_sets_the_exact_value_each_epoch():
    cfg = TrainConfig(epochs=4, lr=0.002, optimizer="sgd", schedule="epoch_warmup_cosine", warmup_epochs=1,
                      warmup_lr=1e-5, seeding="run")
    trainer = Trainer(LinearTask(fixed_batches(3)), cfg, torch.device("cpu"), log=lambda *_: None)
    trainer.fit()
    expected = [1e-5, 0.002, 0.5 * 0.002 * (1 + math.cos(math.pi / 4)), 0.5 * 0.002 * (1 + math.cos(math.pi / 2))]
    assert [r["lr"] for r in trainer.history] == expected  # the values themselves, not factors of the base lr


def test_backward_is_called_in_the_trainer_and_the_speed_benchmark_only():
    package = Path(clipconv.__file__).parent
    calling = sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                     if re.search(r"\.backward\(", p.read_text(encoding="utf-8")))
    assert calling == ["app/bench.py", "training.py"]


def test_killed_pretraining_resumes_to_bit_identical_weights(tiny_config, tmp_path):
    from clipconv.app import pretrain_mini_clip as P
    from clipconv.backbone import load_backbone

    config = P.PretrainConfig(seed=2, steps=5, batch_size=12, pool_size=16, fresh_per_step=4, threads=1)

    def run(state_dir=None, resume=False):
        backbone = load_backbone(str(tiny_config), pretrained=None, device="cpu")  # fixed-seed random init
        return backbone, P.pretrain(backbone, config, log_every=2, state_dir=state_dir, resume=resume)

    straight, summary = run()
    with stopped_after_saving(1), pytest.raises(Killed):
        run(tmp_path)
    assert torch.load(tmp_path / STATE_FILE, weights_only=True)["step"] == 2
    resumed, resumed_summary = run(tmp_path, resume=True)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (resumed_summary["first_loss"], resumed_summary["final_loss"]) == (summary["first_loss"],
                                                                              summary["final_loss"])
