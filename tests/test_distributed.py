"""torchrun DDP (clipconv.runtime.ranks) on CPU with gloo: sharding, global batches, equivalence with one process.

Multi-process tests spawn 2 processes (torch.multiprocessing, gloo, a file:// rendezvous: no port) or run
torchrun itself as a subprocess (marked slow). Float tolerances: a few hundred ulps of the largest |value|
per optimizer step (gradients of the global batch summed in another order).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_world import make_cli_world
from tolerance import EPS32
from torch import nn

from clipconv.data.sharded import GlobalBatchShards, SeededTrainItems, train_loader
from clipconv.runtime import ranks as runtime_ranks
from clipconv.runtime.ranks import shard_bounds

ULPS = 256


# ----- single-process units ---------------------------------------------------------------------------
@pytest.mark.parametrize("n,ranks", [(0, 2), (1, 2), (7, 2), (12, 2), (10, 3), (5, 8)])
def test_shards_are_contiguous_cover_everything_and_differ_by_at_most_one(n, ranks):
    bounds = [shard_bounds(n, ranks, r) for r in range(ranks)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(bounds[r][1] == bounds[r + 1][0] for r in range(ranks - 1))
    sizes = [end - start for start, end in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("n,batch,ranks", [(0, 4, 2), (11, 4, 2), (12, 4, 2), (3, 4, 2), (50, 8, 3)])
def test_evaluation_shards_are_runs_of_the_single_process_batches(n, batch, ranks):
    bounds = [runtime_ranks.batch_shard_bounds(n, batch, ranks, r) for r in range(ranks)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(bounds[r][1] == bounds[r + 1][0] for r in range(ranks - 1))
    assert all(start % batch == 0 for start, end in bounds if end > start)  # batch boundaries kept


def test_one_rank_batches_are_the_dataloaders_shuffled_batches():
    """World size 1: exactly DataLoader(shuffle=True, generator=g, batch_size=B)'s batches and draws."""
    data = list(range(23))
    reference = [b.tolist() for b in torch.utils.data.DataLoader(data, batch_size=5, shuffle=True,
                                                                  generator=torch.Generator().manual_seed(3))]
    g = torch.Generator().manual_seed(3)
    sampler = torch.utils.data.RandomSampler(data, generator=g)
    torch.empty((), dtype=torch.int64).random_(generator=g)  # the DataLoader's base seed, drawn first
    ours = [[i for i, pad in batch] for batch in GlobalBatchShards(sampler, 5, 1, 0)]
    assert ours == reference and len(GlobalBatchShards(sampler, 5)) == len(reference) == 5


@pytest.mark.parametrize("n,batch,ranks", [(23, 6, 2), (9, 4, 2), (10, 4, 4), (12, 6, 3)])
def test_rank_slices_rebuild_every_global_batch_and_short_ones_are_padded(n, batch, ranks):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    global_batches = [order[i:i + batch] for i in range(0, n, batch)]
    per_rank = [list(GlobalBatchShards(order, batch, ranks, r)) for r in range(ranks)]
    assert all(len(p) == len(global_batches) for p in per_rank)  # every rank takes every step
    for step, expected in enumerate(global_batches):
        slices = [per_rank[r][step] for r in range(ranks)]
        assert [i for s in slices for i, pad in s if not pad] == expected  # contiguous, in order
        for s in slices:
            assert len(s) >= 1 and (all(not pad for _, pad in s) or s == [(expected[0], True)])
        if len(expected) == batch:
            assert all(len(s) == batch // ranks for s in slices)


class _Noisy(torch.utils.data.Dataset):
    """Item i: a fixed vector plus random noise drawn from torch's global RNG (an 'augmentation')."""

    def __init__(self, n: int, dim: int = 6, classes: int = 3) -> None:
        g = torch.Generator().manual_seed(11)
        self.x = torch.randn(n, dim, generator=g)
        self.y = torch.arange(n) % classes

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + 0.3 * torch.randn(self.x.shape[1]), int(self.y[i])


def test_augmentation_depends_on_the_item_and_epoch_seed_only_and_keeps_the_callers_rng():
    items = SeededTrainItems(_Noisy(8), round_seed=5)
    forward = {i: items[(i, False)][0] for i in range(8)}
    torch.manual_seed(123)
    state = torch.get_rng_state()
    backward = {i: items[(i, False)][0] for i in reversed(range(8))}
    assert torch.equal(torch.get_rng_state(), state)  # dropout's stream is not disturbed
    assert all(torch.equal(forward[i], backward[i]) for i in range(8))
    assert not torch.equal(forward[0], SeededTrainItems(_Noisy(8), round_seed=6)[(0, False)][0])
    assert items[(3, True)][1] == runtime_ranks.IGNORE_LABEL  # padding adds nothing to the loss


def test_single_process_train_loader_keeps_the_epoch_order():
    data = _Noisy(10)
    labels = torch.cat([y for _, y in train_loader(data, 4, 0, torch.Generator().manual_seed(9))])
    reference = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(9))
    assert torch.equal(labels, torch.cat([y for _, y in reference]))


def test_batch_not_divisible_by_the_processes_is_refused_with_one_line(monkeypatch):
    from clipconv.app.session import build_method_config

    monkeypatch.setattr(runtime_ranks, "world_size", lambda: 4)
    with pytest.raises(ValueError) as err:
        runtime_ranks.check_batch_size(6)
    assert "--batch-size 6" in str(err.value) and "4 processes" in str(err.value) and "\n" not in str(err.value)
    runtime_ranks.check_batch_size(8)
    with pytest.raises(ValueError, match="method 'convpass': --batch-size 6"):
        build_method_config("convpass", options={"batch_size": 6})
    build_method_config("linear_probe")  # methods that do not train with DDP are not concerned


def test_without_torchrun_nothing_changes(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert runtime_ranks.init_from_env("cpu") == 1 and not runtime_ranks.is_distributed()
    assert runtime_ranks.on_main(lambda: 7) == 7 and runtime_ranks.shard([1, 2, 3]) == [1, 2, 3]
    model = nn.Linear(2, 2)
    assert runtime_ranks.wrap_model(model, torch.device("cpu")) is model
    assert runtime_ranks.rank_seed(42) == 42
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        runtime_ranks.launch_from_env({"WORLD_SIZE": "two"})


def test_other_ranks_write_no_file(tmp_path, monkeypatch):
    from clipconv.runtime.outputs import remove_stale_temps, write_json

    monkeypatch.setattr(runtime_ranks, "rank", lambda: 1)
    write_json(tmp_path / "sub" / "x.json", {"a": 1})
    stale = tmp_path / ".y.json.abc.tmp"
    stale.write_text("")
    assert remove_stale_temps(tmp_path / "y.json") == [] and stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [stale.name]
    monkeypatch.setattr(runtime_ranks, "rank", lambda: 0)
    write_json(tmp_path / "x.json", {"a": 1})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}


# ----- two spawned processes --------------------------------------------------------------------------
def _join(rank: int, world: int, store: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def _train(out: Path, rank: int = 0, world: int = 1, store: str = "") -> None:
    """Train a small linear classifier (L2-SP on) on 9 noisy items, batch 4: the global batches are 4, 4, 1,
    so the last one leaves rank 1 a padding item."""
    from clipconv.training import TrainConfig, Trainer

    if world > 1:
        _join(rank, world, store)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.0), nn.Linear(8, 3))
    data = _Noisy(9)
    cfg = TrainConfig(epochs=3, batch_size=4, lr=0.05, l2sp=0.1, seed=4)
    trainer = Trainer.classifier(model, lambda g: train_loader(data, cfg.batch_size, 0, g), 3, cfg, torch.device("cpu"),
                      log=lambda *_: None)
    trainer.fit()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save({"weights": weights, "history": trainer.history}, out / f"train_rank{rank}_of{world}.pt")


def _spawn(fn, tmp_path: Path, *args) -> None:
    """Run fn(rank, 2, store, tmp_path, *args) in 2 processes forked from a server that has imported torch,
    open_clip and clipconv once (for all tests of this file), so each test pays no import time."""
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(["torch", "open_clip", "clipconv.backbone", "clipconv.training",
                                            "clipconv.evaluation", "clipconv.features", __name__])
    mp.start_processes(fn, args=(2, str(tmp_path / "store"), tmp_path, *args), nprocs=2, join=True,
                       start_method="forkserver")


def _train_worker(rank: int, world: int, store: str, out: Path) -> None:
    _train(out, rank, world, store)


def test_two_processes_train_the_same_weights_as_one(tmp_path):
    _train(tmp_path)
    _spawn(_train_worker, tmp_path)
    one = torch.load(tmp_path / "train_rank0_of1.pt")
    two = [torch.load(tmp_path / f"train_rank{r}_of2.pt") for r in range(2)]
    steps = 3 * 3
    for name, expected in one["weights"].items():
        assert torch.equal(two[0]["weights"][name], two[1]["weights"][name])  # DDP keeps the ranks identical
        tol = ULPS * EPS32 * float(expected.abs().max()) * steps
        assert float((two[0]["weights"][name] - expected).abs().max()) <= tol, name
    for a, b in zip(one["history"], two[0]["history"]):
        assert a["train_top1"] == b["train_top1"] and a["lr"] == b["lr"]
        assert abs(a["loss"] - b["loss"]) <= ULPS * EPS32 * abs(a["loss"])
    untimed = [[{k: v for k, v in record.items() if k != "seconds"} for record in t["history"]] for t in two]
    assert untimed[0] == untimed[1]


def _evaluate(out: Path, data: Path, config: str, rank: int = 0, world: int = 1, store: str = "") -> None:
    """collect_logits and FeatureStore.encode (cache in out/cache) over 11 images, eval batch 4."""
    from clipconv.backbone import load_backbone
    from clipconv.evaluation import collect_logits
    from clipconv.features import FeatureStore

    if world > 1:
        _join(rank, world, store)
    torch.manual_seed(0)
    backbone = load_backbone(config, pretrained=None, device="cpu")
    samples = [(str(p.relative_to(data)), i % 3) for i, p in enumerate(sorted(data.rglob("*.JPEG")))][:11]
    assert len(samples) == 11
    logits, labels = collect_logits(backbone.model.encode_image, data, samples, backbone.eval_transform,
                                    torch.device("cpu"), batch_size=4)
    store_ = FeatureStore(backbone, out / f"cache{world}", batch_size=4)
    feats = store_.encode(data, samples[::-1], transform="train", rounds=2, seed=3)  # augmented, caller's order
    again = store_.encode(data, samples[::-1], transform="train", rounds=2, seed=3)
    torch.save({"logits": logits, "labels": labels, "features": feats, "again": again, "hits": store_.cache_hits,
                "calls": store_.encoder_calls}, out / f"eval_rank{rank}_of{world}.pt")


def _eval_worker(rank: int, world: int, store: str, out: Path, data: Path, config: str) -> None:
    _evaluate(out, data, config, rank, world, store)


def test_two_process_evaluation_and_features_equal_one_process_exactly(tmp_path, tiny_config):
    from clipconv.data import make_image_tree

    data = make_image_tree(tmp_path / "data", train_per_class=3, val_per_class=0, variants=())
    _evaluate(tmp_path, data, str(tiny_config))
    _spawn(_eval_worker, tmp_path, data, str(tiny_config))
    one = torch.load(tmp_path / "eval_rank0_of1.pt")
    for rank in range(2):
        two = torch.load(tmp_path / f"eval_rank{rank}_of2.pt")
        for key in ("logits", "labels", "features", "again"):
            assert torch.equal(two[key], one[key]), key  # same values, same (dataset) order, on every rank
        assert two["hits"] == one["hits"] == 1 and two["calls"] == one["calls"] == 2 * 11
    assert len(list((tmp_path / "cache2").glob("*.safetensors"))) == 1  # written once, by rank 0
    assert not list((tmp_path / "cache2").glob(".*.tmp"))


# ----- torchrun, end to end (slow) --------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_config):
    return make_cli_world(tmp_path_factory.mktemp("ddp"), tiny_config)


def _train_argv(world, out, epochs=2, batch=4):
    return ["--data-root", str(world["data"]), "--model", str(world["config"]), "--pretrained", str(world["weights"]),
            "--shots", "4", "--epochs", str(epochs), "--batch-size", str(batch), "--lr", "1e-3", "--dropout", "0",
            "--workers", "0", "--threads", "1", "--eval-batch-size", "3", "--no-cache", "--save-logits",
            "--output-dir", str(out)]


def _torchrun(args, module="clipconv.app.cli.train", **kwargs):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", module, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, **kwargs)


def _adapter(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter.safetensors"))


@pytest.mark.slow
def test_torchrun_training_matches_one_process_and_refuses_an_uneven_batch(world):
    from clipconv.app.cli import train

    root = world["root"]
    assert train.main(_train_argv(world, root / "one")) == 0
    two = _torchrun(_train_argv(world, root / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _adapter(root / "one"), _adapter(root / "two")
    steps = 2 * 4
    for name in a:
        assert float((a[name] - b[name]).abs().max()) <= ULPS * EPS32 * float(a[name].abs().max()) * steps, name
    assert json.loads((root / "one/metrics.json").read_text()) == json.loads((root / "two/metrics.json").read_text())
    env = json.loads((root / "two/config.json").read_text())["environment"]
    assert env["world_size"] == 2 and env["backend"] == "gloo"
    assert json.loads((root / "one/config.json").read_text())["environment"]["world_size"] == 1
    log = (root / "two/log.txt").read_text()
    assert log.count("epoch 2/2: loss") == 1  # rank 0 alone logs
    assert two.stdout.count("run directory:") == 1

    # a non-divisible global batch is refused before anything is written
    bad = _torchrun(_train_argv(world, root / "bad", batch=3))
    assert bad.returncode != 0 and "--batch-size 3 is not divisible by the 2 processes" in bad.stderr
    assert re.search(r"exitcode\s*:\s*2\b", bad.stderr)  # the workers exit 2 (torchrun itself exits 1)
    assert not (root / "bad").exists()


@pytest.mark.slow
def test_torchrun_run_killed_after_an_epoch_resumes_to_the_straight_run(world):
    root = world["root"]
    straight = _torchrun(_train_argv(world, root / "straight", epochs=6))
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = root / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "clipconv.app.cli.train", *_train_argv(world, killed, epochs=6)]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    state = killed / "train_state.pt"
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers at once
    proc.wait()
    saved = torch.load(state, weights_only=True)["epoch"]
    assert 1 <= saved < 6, f"kill came too late (epoch {saved})"
    resumed = _torchrun(["--resume", str(killed)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {state} after epoch" in resumed.stderr
    a, b = _adapter(root / "straight"), _adapter(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same collectives in the same order: bit-identical
    assert json.loads((root / "straight/metrics.json").read_text()) == json.loads((killed / "metrics.json").read_text())


@pytest.mark.slow
def test_torchrun_evaluation_of_a_checkpoint_equals_one_process_bit_for_bit(world):
    from safetensors.torch import load_file

    from clipconv.app.cli import eval_robustness, train

    root = world["root"]
    run = root / "to-eval"
    assert train.main(_train_argv(world, run)) == 0
    argv = ["--checkpoint", str(run / "adapter.safetensors"), "--data-root", str(world["data"]), "--workers", "0",
            "--eval-batch-size", "5", "--save-logits", "--threads", "1"]
    assert eval_robustness.main([*argv, "--output-dir", str(root / "eval-one")]) == 0
    two = _torchrun([*argv, "--output-dir", str(root / "eval-two")], module="clipconv.app.cli.eval_robustness")
    assert two.returncode == 0, two.stderr[-3000:]
    names = sorted(p.name for p in (root / "eval-one").glob("*_logits.safetensors"))
    assert len(names) == 5 and names == sorted(p.name for p in (root / "eval-two").glob("*_logits.safetensors"))
    for name in names:
        a, b = load_file(str(root / "eval-one" / name)), load_file(str(root / "eval-two" / name))
        assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["labels"], b["labels"]), name
    assert (json.loads((root / "eval-one/metrics.json").read_text())
            == json.loads((root / "eval-two/metrics.json").read_text()))


@pytest.mark.slow
def test_torchrun_table2_matches_one_process(world):
    from clipconv.app.cli import run_table2

    root = world["root"]
    argv = ["--data-root", str(world["data"]), "--model", str(world["config"]), "--pretrained", str(world["weights"]),
            "--shots", "4", "--seeds", "1", "--methods", "zero_shot", "linear_probe", "convpass", "--method-options",
            json.dumps({"convpass": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "dropout": 0}}),
            "--workers", "0", "--threads", "1", "--eval-batch-size", "3"]
    assert run_table2.main([*argv, "--cache-dir", str(root / "cache-one"), "--output-dir", str(root / "t-one")]) == 0
    two = _torchrun([*argv, "--cache-dir", str(root / "cache-two"), "--output-dir", str(root / "t-two")],
                    module="clipconv.app.cli.run_table2")
    assert two.returncode == 0, two.stderr[-3000:]
    one_t, two_t = (json.loads((root / f"t-{k}/table2.json").read_text()) for k in ("one", "two"))
    for name in ("zero_shot", "linear_probe", "convpass"):
        assert one_t["per_seed"][name]["1"]["metrics"] == two_t["per_seed"][name]["1"]["metrics"], name
    assert two_t["environment"]["world_size"] == 2
    assert (sorted(p.name for p in (root / "cache-one").iterdir())
            == sorted(p.name for p in (root / "cache-two").iterdir()))  # the same entries, written once
