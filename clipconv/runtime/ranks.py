"""Ranks of a `torchrun` launch (torch.distributed): process group, sharding bounds, gathering, DDP.

    torchrun --nproc_per_node 4 scripts/train_imagenet_fs.py --data-root $DATA ...

Without torchrun's environment (WORLD_SIZE unset or 1) every function here is the single-process
identity: no process group, the whole sample list, no wrapping. Under torchrun:

* `init_from_env(device)` joins the process group (gloo on CPU, nccl on CUDA, one GPU per local rank);
* evaluation and feature extraction read one contiguous shard of the sample list per rank, made of
  whole batches of the single-process run (`batch_shard_bounds`), and `gather_rows` concatenates the
  shards in rank order, i.e. in dataset order, on every rank: the logits and features are bit-identical
  to one process's;
* training keeps the single-process global batch and epoch order: `train_loader` draws the epoch's
  permutation exactly as DataLoader(shuffle=True, generator=g) does, cuts it into global batches of
  `batch_size` and gives each rank a contiguous slice of every global batch; the engine scales each
  rank's summed loss so DDP's gradient average equals the gradient of the global batch's mean loss;
* augmentation of item i in an epoch is seeded by (epoch seed, i) (`SeededTrainItems`), whatever rank
  or worker reads it;
* files are written by rank 0 only (`clipconv.runtime.outputs` drops other ranks' writes); folders are
  created on rank 0 and their path broadcast (`on_main`).

A leaf: it imports nothing of clipconv. The training loader that shards global batches is
`clipconv.data.sharded`.
"""
from __future__ import annotations

import atexit
import inspect
import os
import pickle
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, TypeVar, Union

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

__all__ = ["init_from_env", "is_distributed", "world_size", "rank", "is_main", "backend", "barrier",
           "on_main", "broadcast_object", "gather_objects", "all_reduce_sum", "shard_bounds", "batch_shard_bounds", "shard",
           "gather_rows", "local_device", "wrap_model", "check_batch_size", "rank_seed", "IGNORE_LABEL"]

T = TypeVar("T")
#: the label of a padding item (a rank whose slice of a short last global batch is empty): cross-entropy's
#: ignore_index, so it adds nothing to the loss, the count or the accuracy
IGNORE_LABEL = -100


def _dist():
    return torch_dist if torch_dist.is_available() and torch_dist.is_initialized() else None


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    dist = _dist()
    return dist is not None and dist.get_world_size() > 1


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist is not None else 1


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist is not None else 0


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes files and logs to them."""
    return rank() == 0


def backend() -> Optional[str]:
    """"gloo" / "nccl" inside a process group, else None."""
    dist = _dist()
    return str(dist.get_backend()) if dist is not None else None


@dataclass(frozen=True)
class Launch:
    """What torchrun's environment says about this process."""

    world_size: int
    rank: int
    local_rank: int


def launch_from_env(environ: Optional[dict] = None) -> Launch:
    """WORLD_SIZE / RANK / LOCAL_RANK (torchrun sets them); 1 / 0 / 0 when absent."""
    env = os.environ if environ is None else environ
    try:
        return Launch(int(env.get("WORLD_SIZE", 1)), int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)))
    except ValueError as err:
        raise ValueError(f"torchrun's WORLD_SIZE/RANK/LOCAL_RANK are not integers ({err}); launch with torchrun") from None


def init_from_env(device: Optional[str] = None) -> int:
    """Join the process group torchrun describes (no-op when WORLD_SIZE is unset or 1, or already joined);
    returns the world size. Backend: nccl when the run's `device` is CUDA ("auto" with a GPU present),
    else gloo. On CUDA each process takes the GPU of its LOCAL_RANK."""
    dist = torch_dist
    launch = launch_from_env()
    if launch.world_size <= 1 or (dist.is_available() and dist.is_initialized()):
        return world_size()
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed; run without torchrun")
    wants_cuda = str(device or "auto").startswith("cuda") or (str(device or "auto") == "auto"
                                                               and torch.cuda.is_available())
    if wants_cuda:
        if launch.local_rank >= torch.cuda.device_count():
            raise ValueError(f"torchrun started local rank {launch.local_rank} but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s); lower --nproc_per_node")
        torch.cuda.set_device(launch.local_rank)
    dist.init_process_group(backend="nccl" if wants_cuda else "gloo")
    atexit.register(_shutdown)
    return dist.get_world_size()


def _shutdown() -> None:
    dist = _dist()
    if dist is not None:
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, "cuda" becomes this process's GPU (cuda:LOCAL_RANK); anything else is kept."""
    if is_distributed() and device.type == "cuda":
        return torch.device("cuda", launch_from_env().local_rank)
    return device


def barrier() -> None:
    dist = _dist()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """`obj` of rank `src` on every rank (pickled; tensors travel on CPU)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: T) -> list[T]:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over ranks (in place; `tensor` itself when single)."""
    if is_distributed():
        _dist().all_reduce(tensor)
    return tensor


class _Failure:
    """An exception of rank 0, sent to the other ranks so that they fail the same way."""

    def __init__(self, err: BaseException) -> None:
        self.kind = type(err) if _picklable(type(err)) else RuntimeError
        self.message = str(err)


def _picklable(kind: type) -> bool:
    try:
        pickle.dumps(kind)
        return True
    except Exception:
        return False


def on_main(fn: Callable[[], T]) -> T:
    """`fn()` run on rank 0 only (e.g. create the run folder), its result broadcast to every rank; an
    exception of rank 0 is raised on every rank (same type and message). All ranks reach this point
    before rank 0 starts (so no rank still checks what rank 0 is about to change)."""
    if not is_distributed():
        return fn()
    barrier()
    result: Union[T, _Failure, None] = None  # None on the other ranks until the broadcast
    if is_main():
        try:
            result = fn()
        except Exception as err:
            broadcast_object(_Failure(err))
            raise
    result = broadcast_object(result)
    if isinstance(result, _Failure):
        raise result.kind(result.message)
    return result


def rank_seed(seed: int) -> int:
    """The torch seed of a rank's epoch (dropout masks): `seed` itself on rank 0 (and single-process)."""
    return int(seed) if rank() == 0 else (int(seed) * 1_000_003 + 104_729 * rank()) % (2**63 - 1)


# ----- sharding of evaluation and feature extraction -------------------------------------------------
def shard_bounds(n: int, ranks: Optional[int] = None, index: Optional[int] = None) -> tuple[int, int]:
    """[start, end) of rank `index`'s contiguous shard of n items: sizes differ by at most one, the first
    n % ranks shards are the larger ones (numpy.array_split's rule)."""
    ranks = world_size() if ranks is None else ranks
    index = rank() if index is None else index
    base, extra = divmod(int(n), ranks)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def batch_shard_bounds(n: int, batch_size: int, ranks: Optional[int] = None,
                       index: Optional[int] = None) -> tuple[int, int]:
    """[start, end) of rank `index`'s shard made of whole batches: the ceil(n / batch_size) batches of one
    process are split by `shard_bounds`, so every item is processed in the same batch as in one process
    (same shapes, same kernels: bit-identical results)."""
    batches = -(-int(n) // int(batch_size))
    first, last = shard_bounds(batches, ranks, index)
    return min(first * batch_size, n), min(last * batch_size, n)


def shard(items: Sequence[T], batch_size: int = 1) -> Sequence[T]:
    """This rank's contiguous shard of `items` in whole batches of `batch_size` (all of them when single)."""
    start, end = batch_shard_bounds(len(items), batch_size)
    return items[start:end]


def gather_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor's shards concatenated along dim 0 in rank order (= dataset order for `shard`), on every
    rank; empty shards (a rank with no items, or only undecodable ones) are left out."""
    if not is_distributed():
        return tensors
    pieces = gather_objects(tuple(t.detach().cpu() for t in tensors))
    out = []
    for column, own in zip(zip(*pieces), tensors):
        kept = [piece for piece in column if piece.shape[0] > 0]
        out.append(torch.cat(kept) if kept else own.detach().cpu())
    return tuple(out)


# ----- training ---------------------------------------------------------------------------------------
def check_batch_size(batch_size: int, flag: str = "--batch-size") -> None:
    """Refuse a global batch that the processes cannot split evenly (ValueError, one line)."""
    ranks = world_size()
    if ranks > 1 and int(batch_size) % ranks:
        raise ValueError(f"{flag} {batch_size} is not divisible by the {ranks} processes torchrun started; "
                         f"give a multiple of {ranks} (the global batch is split evenly across processes)")


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` in DistributedDataParallel under torchrun (only parameters that require grad are synced;
    no unused-parameter search; no buffer broadcast: the models are BatchNorm-free), else `model`."""
    if not is_distributed():
        return model
    norms = [name for name, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and m.training and any(p.requires_grad for p in m.parameters())]
    if norms:  # per-rank batch statistics would differ from the single-process run
        raise ValueError(f"distributed training of a model with trainable BatchNorm ({norms[0]}) is not supported; "
                         "run in one process")
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    options = {"device_ids": ids, "find_unused_parameters": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:  # newer torch
        options["forward_sync_buffers"] = False
    else:
        options["broadcast_buffers"] = False
    return DistributedDataParallel(model, **options)
