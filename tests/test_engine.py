"""Training engine: frozen weights untouched, resume after SIGKILL is bit-identical, NaN stops the run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from cli_world import run_cli
from tiny_tasks import stopped_after_saving
from torch import nn

from clipconv.app.cli import train
from clipconv.training import TrainConfig, Trainer, TrainingDivergedError, build_scheduler


def test_frozen_weights_are_bit_identical_after_training_and_only_trainables_move(tmp_path, tiny_backbone):
    from clipconv.data import make_image_tree, resolve_run_classes, train_samples
    from clipconv.methods import FitContext, build_method

    data = make_image_tree(tmp_path / "data", train_per_class=4, val_per_class=1, variants=())
    classes = resolve_run_classes(data)
    before = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    method = build_method("convpass", epochs=2, batch_size=4, lr=1e-2)
    ctx = FitContext(backbone=tiny_backbone, classnames=classes.names, data_root=data,
                     train=train_samples(data, classes), class_ids=classes.ids, class_hash=classes.hash(),
                     log=lambda *_: None)
    method.build(ctx)
    clf = method.classifier
    frozen_before = {n: p.detach().clone() for n, p in clf.named_parameters() if not p.requires_grad}
    trainable_before = {n: p.detach().clone() for n, p in clf.named_parameters() if p.requires_grad}
    method.fit(ctx)
    for name, tensor in tiny_backbone.model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"backbone tensor {name} changed"
    for name, param in clf.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, frozen_before[name]), f"frozen {name} changed"
    moved = [n for n, p in clf.named_parameters() if p.requires_grad and not torch.equal(p, trainable_before[n])]
    assert any(n.startswith("head.") for n in moved) and any(".up." in n for n in moved)


def test_cosine_schedule_with_warmup():
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, TrainConfig(epochs=2, warmup_epochs=1), steps_per_epoch=4)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] < lrs[5] < lrs[4]
    no_warmup = build_scheduler(torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0),
                                TrainConfig(epochs=1), steps_per_epoch=4)
    assert no_warmup.get_last_lr()[0] == pytest.approx(1.0)


def test_non_finite_loss_stops_with_epoch_step_and_lr_and_writes_nothing(tmp_path):
    model = nn.Linear(3, 2)
    batches = [(torch.randn(2, 3), torch.tensor([0, 1])), (torch.full((2, 3), float("nan")), torch.tensor([0, 1]))]
    trainer = Trainer.classifier(model, lambda g: batches, 2, TrainConfig(epochs=1, lr=0.1), torch.device("cpu"),
                      run_dir=tmp_path, log=lambda *_: None)
    with pytest.raises(TrainingDivergedError, match=r"epoch 1, step 2, lr"):
        trainer.fit()
    assert not (tmp_path / "train_state.pt").exists()


def test_resume_refuses_changed_settings(tmp_path):
    model = nn.Linear(3, 2)
    batches = [(torch.randn(2, 3), torch.tensor([0, 1]))]
    Trainer.classifier(model, lambda g: batches, 1, TrainConfig(epochs=1), torch.device("cpu"), tmp_path, log=lambda *_: None).fit()
    other = Trainer.classifier(model, lambda g: batches, 1, TrainConfig(epochs=1, lr=1.0), torch.device("cpu"), tmp_path)
    with pytest.raises(ValueError, match="training settings differ"):
        other.load_state(tmp_path / "train_state.pt")


@pytest.fixture(scope="module")
def resume_world(tmp_path_factory, tiny_config):
    from clipconv.data import make_image_tree

    root = tmp_path_factory.mktemp("resume")
    data = make_image_tree(root / "data", train_per_class=24, val_per_class=2, variants=("sketch",), seed=5)
    return root, data


def _cli(root, data, config, out, *extra):
    return [sys.executable, "-m", "clipconv.app.cli.train", "--data-root", str(data), "--model", str(config),
            "--pretrained", "none", "--shots", "24", "--epochs", "6", "--batch-size", "4", "--lr", "1e-3",
            "--workers", "0", "--output-dir", str(out), "--no-cache", "--eval-sets", "imagenet", "imagenet_sketch",
            *extra]


@pytest.mark.slow  # SIGKILL of a real CLI process mid-epoch, then a resume; in-process kills: test_trainer.py
def test_run_killed_mid_epoch_resumes_to_identical_weights_and_metrics(resume_world, tiny_config):
    from safetensors.torch import load_file

    root, data = resume_world
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight = root / "straight"
    subprocess.run(_cli(root, data, tiny_config, straight), check=True, env=env, capture_output=True)

    killed = root / "killed"
    proc = subprocess.Popen(_cli(root, data, tiny_config, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = killed / "train_state.pt"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # into the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists(), "no checkpoint was written before the kill"
    saved_epoch = torch.load(state, weights_only=True)["epoch"]
    assert 1 <= saved_epoch < 6, f"kill came too late (epoch {saved_epoch})"
    assert not (killed / "metrics.json").exists()
    # a kill during a save may leave a temp file, never a damaged train_state.pt (it loaded above)

    resumed = subprocess.run([sys.executable, "-m", "clipconv.app.cli.train", "--resume", str(killed)], env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {state} after epoch" in resumed.stderr
    a, b = load_file(str(straight / "adapter.safetensors")), load_file(str(killed / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((straight / "metrics.json").read_text()) == json.loads((killed / "metrics.json").read_text())
    assert not [p for p in killed.iterdir() if p.name.endswith(".tmp")]  # stale temps of the kill are gone


def _sigint_as_in_a_shell() -> None:
    """A pytest-xdist worker ignores SIGINT and its children inherit that (Python then installs no Ctrl-C
    handler); a process started from a shell has the default disposition."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow  # a real CLI process and a real SIGINT; the in-process version follows
def test_ctrl_c_stops_cleanly_and_says_how_to_resume(resume_world, tiny_config):
    root, data = resume_world
    out = root / "interrupted"
    proc = subprocess.Popen(_cli(root, data, tiny_config, out, "--epochs", "40"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=_sigint_as_in_a_shell)
    deadline = time.time() + 120
    while not (out / "train_state.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert f"--resume {out}" in err
    assert torch.load(out / "train_state.pt", weights_only=True)["epoch"] >= 1


def test_ctrl_c_after_the_first_checkpoint_exits_130_and_says_how_to_resume(resume_world, tiny_config):
    """In-process: Ctrl-C arrives as KeyboardInterrupt right after the first epoch's checkpoint."""
    root, data = resume_world
    out = root / "interrupted_in_process"
    with stopped_after_saving(1, KeyboardInterrupt):
        result = run_cli(train.main, _cli(root, data, tiny_config, out, "--epochs", "40")[3:])
    assert result.returncode == 130, result.stderr[-2000:]
    assert f"--resume {out}" in result.stderr and "Traceback" not in result.stderr
    assert torch.load(out / "train_state.pt", weights_only=True)["epoch"] == 1
    assert not (out / "metrics.json").exists()


def test_an_epoch_without_any_decodable_image_is_an_error():
    trainer = Trainer.classifier(nn.Linear(3, 2), lambda g: [], 1, TrainConfig(epochs=1), torch.device("cpu"), log=lambda *_: None)
    with pytest.raises(ValueError, match="no decodable training image"):
        trainer.fit()


@pytest.mark.slow  # three CLI processes (run, SIGTERM, resume); the in-process resume tests are in test_trainer.py
def test_sigterm_stops_like_ctrl_c_with_exit_143_and_the_run_resumes(resume_world, tiny_config):
    root, data = resume_world
    out = root / "terminated"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_cli(root, data, tiny_config, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.time() + 120
    while not (out / "train_state.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert f"--resume {out}" in err and "Traceback" not in err
    assert not (out / "metrics.json").exists() and not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    resumed = subprocess.run([sys.executable, "-m", "clipconv.app.cli.train", "--resume", str(out)], env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (out / "metrics.json").is_file()


def test_sigterm_handler_is_restored_after_the_run():
    from clipconv.app.rundir import Terminated, interrupt_on_sigterm

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt) as caught:
        with interrupt_on_sigterm():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert isinstance(caught.value, Terminated)
    assert signal.getsignal(signal.SIGTERM) is before


def test_resume_without_a_saved_state_removes_the_stale_temps_of_a_killed_first_save(tmp_path):
    """Killed during its first save: no train_state.pt yet, only `.train_state.pt.*.tmp`; resuming starts from
    scratch and leaves no temp file behind."""
    stale = tmp_path / ".train_state.pt.x1y2z3.tmp"
    stale.write_bytes(b"half a state")
    trainer = Trainer.classifier(nn.Linear(3, 2), lambda g: [(torch.randn(2, 3), torch.tensor([0, 1]))], 1,
                                 TrainConfig(epochs=1), torch.device("cpu"), tmp_path, log=lambda *_: None)
    assert trainer.resume_if_saved(True) is False
    assert not stale.exists()
