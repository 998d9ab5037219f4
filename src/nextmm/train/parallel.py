"""Data-parallel training with torchrun. Everything distributed lives here, out of the model code (torchtitan's
rule): the stages ask this module who they are, how many they are and how to reduce, and a world of one is the
plain path, in which nothing is started, wrapped or reduced.

Under torchrun (`nextmm train --nproc N`, or `torchrun --nproc_per_node N -m nextmm.train ...`) every process
is a rank: it joins a process group (gloo on the CPU; NCCL on CUDA, each rank on the GPU of its LOCAL_RANK), trains
stages 1 and 2 on its own part of every global batch, stage 1's model either whole in each (DistributedDataParallel)
or sharded among them (FSDP2, train/parallelize.py), and only rank 0 prints and writes files, but for each rank's part
of a sharded checkpoint. Stage 0 runs on rank 0 alone while the others wait (`on_main`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from nextmm.device import pick_device
from nextmm.errors import UserError

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 1800.0
# The other ranks' wait while rank 0 trains stage 0 alone may last hours, so it has no practical limit; a rank
# that dies still ends it at once, since the dead process's connections close.
SOLO_WAIT = timedelta(days=7)


class ParallelError(UserError):
    """Settings several processes cannot run with, or a process that stopped answering: one sentence each."""


@dataclass
class _World:
    rank: int
    size: int
    device: torch.device  # this rank's device, where its collectives' tensors live
    timeout_s: float
    wait: Any  # a gloo group with a long timeout, for the waits of `on_main`
    owned: bool  # whether setup() made the process group (and teardown() ends it)


_world: _World | None = None
_solo = False  # inside on_main(): rank 0 working alone sees a world of one


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_processes() -> int:
    """How many processes torchrun started on this machine (1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def rank() -> int:
    return 0 if _world is None or _solo else _world.rank


def world() -> int:
    return 1 if _world is None or _solo else _world.size


def is_main() -> bool:
    """Whether this process writes the run's files and prints (rank 0, or the only process)."""
    return rank() == 0


def setup(device: str | None = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """The device to train on: `device.pick_device` alone in one process; under torchrun, this rank's device
    once the process group is up (a collective that waits longer than `timeout_s` for another rank fails)."""
    global _world
    if not launched():
        return pick_device(device)
    if _world is not None:
        return _world.device
    where = pick_device(device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if where.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ParallelError(f"local rank {local} has no GPU of its own (this machine has {torch.cuda.device_count()}); start at most that many processes per machine")
        where = torch.device("cuda", local)
        torch.cuda.set_device(where)
    elif where.type != "cpu":
        raise ParallelError(f"several processes train on CUDA GPUs or on the CPU, not on {where.type}; use --device cuda or --device cpu")
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    wait = dist.new_group(backend="gloo", timeout=SOLO_WAIT)
    _world = _World(dist.get_rank(), dist.get_world_size(), where, timeout_s, wait, owned)
    if _world.rank != 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 speaks for all, to the process's end; errors still reach stderr
    return where


def teardown() -> None:
    global _world
    if _world is None:
        return
    dist.destroy_process_group(None if _world.owned else _world.wait)
    _world = None


def lost(err: Exception) -> ParallelError:
    """A failed collective (a rank died, or did not answer in time) as one sentence."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    assert _world is not None
    return ParallelError(
        f"process {_world.rank} of {_world.size} stops because another one died or did not answer within "
        f"{_world.timeout_s:g} s (--timeout): {first[:200]}"
    )


@contextlib.contextmanager
def session(device: str | None = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[torch.device]:
    """setup(), and teardown() however the block ends (of a process group setup() made); a failed collective
    leaves it as ParallelError."""
    made = _world is None
    where = setup(device, timeout_s)
    try:
        yield where
    except RuntimeError as err:
        # gloo reports a timeout or a closed connection as a plain RuntimeError naming its own source file
        if _world is not None and (isinstance(err, dist.DistError) or "gloo" in str(err)):
            raise lost(err) from err
        raise
    finally:
        if made:
            teardown()


def local_batch(batch_size: int, key: str, processes: int | None = None) -> int:
    """Each process's part of a global batch of `batch_size` (the setting `key`) among `processes` (default: this
    run's)."""
    n = processes or world()
    if batch_size % n:
        raise ParallelError(f"{key}={batch_size} does not split evenly among {n} processes; set it to a multiple of {n}")
    return batch_size // n


def part() -> tuple[int, int]:
    """(rank, world): which part of every global batch this process trains on."""
    return rank(), world()


class Objective(nn.Module):
    """DDP and FSDP synchronise gradients through their module's forward; a stage's loss is a function of a batch,
    so it is this module's forward."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[dict], dict], unsharded: list[nn.Parameter] = ()):
        """`unsharded`: parameters FSDP leaves whole, whose gradients reduce_unsharded averages."""
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.unsharded = list(unsharded)

    def forward(self, batch: dict) -> dict:
        return self.loss_fn(batch)


def wrap(model: nn.Module, loss_fn: Callable[[dict], dict]) -> Callable[[dict], dict]:
    """`loss_fn` (over a batch, using `model`) as DistributedDataParallel runs it: the backward of what it returns
    averages the gradients of `model` over the ranks. `loss_fn` itself in one process."""
    if world() == 1:
        return loss_fn
    assert _world is not None
    ids = [_world.device.index] if _world.device.type == "cuda" else None
    # find_unused_parameters: a batch need not reach every parameter (a text-to-image batch computes no word
    # logits; a head's parameters wait for its kind of data), and DDP must not wait for their gradients. Buffers
    # are rank 0's at every forward (DDP's broadcast), so that a running statistic (the copy head's mean picture)
    # stays one model's.
    return DistributedDataParallel(Objective(model, loss_fn), device_ids=ids, find_unused_parameters=True)


@contextlib.contextmanager
def syncing(objective: Callable, last: bool) -> Iterator[None]:
    """Around a micro-batch's forward and backward: only the step's last one reduces gradients over the ranks (the
    sum the others accumulated locally goes with it: DDP's no_sync, FSDP's gradient sync switched off)."""
    if last:
        yield
    elif isinstance(objective, DistributedDataParallel):
        with objective.no_sync():
            yield
    elif isinstance(objective, FSDPModule):
        objective.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            objective.set_requires_gradient_sync(True)
    else:
        yield


def reduce_unsharded(objective: Callable) -> None:
    """After a step's last backward: the gradients of the parameters a sharded objective leaves whole averaged over
    the ranks, as FSDP averages the others' (a rank that did not reach one counts a zero gradient)."""
    params = [p for p in getattr(objective, "unsharded", ()) if p.requires_grad]
    if not params:
        return
    grads = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
    dist.all_reduce(grads)
    for p, grad in zip(params, grads / world()):
        p.grad = grad


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP has sharded the module's parameters (each rank holds a DTensor's part of each)."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def own_randomness() -> None:
    """Each rank its own torch random stream, drawn from the state the ranks share (one seed, or rank 0's
    checkpoint): the noise, timesteps and dropped conditions of their parts of a batch then differ, as they do
    between a batch's rows in one process, rather than repeating on every rank."""
    if world() > 1:
        torch.manual_seed(int(torch.randint(0, 2**62, ())) + rank())


def _reduce(values: list[float], op: dist.ReduceOp.RedOpType) -> list[float]:
    if world() == 1:
        return list(values)
    assert _world is not None
    tensor = torch.tensor(values, dtype=torch.float64, device=_world.device)
    dist.all_reduce(tensor, op)
    return tensor.tolist()


def sum_over_ranks(values: list[float]) -> list[float]:
    return _reduce(values, dist.ReduceOp.SUM)


def max_over_ranks(value: float) -> float:
    return _reduce([value], dist.ReduceOp.MAX)[0]


def mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Each metric's mean over the ranks; one a rank lacks counts as 0 there (stage 1's loss terms come scaled so
    that this mean is the global batch's value, and a rank without a term adds nothing to it)."""
    if world() == 1:
        return metrics
    every: list[dict[str, float]] = [{} for _ in range(world())]
    dist.all_gather_object(every, metrics)
    keys = list(dict.fromkeys(k for m in every for k in m))
    return {k: sum(m.get(k, 0.0) for m in every) / world() for k in keys}


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T | None:
    """fn() on rank 0 alone, which sees a world of one inside it (its Trainer is the one-process one), while the
    other ranks wait: fn's result on rank 0, None on the others."""
    global _solo
    if world() == 1:
        return fn()
    assert _world is not None
    result = None
    if _world.rank == 0:
        _solo = True
        try:
            result = fn()
        finally:
            _solo = False
    dist.barrier(group=_world.wait)
    return result


def launch(nproc: int, argv: list[str]) -> int:
    """`nextmm ARGV` as `nproc` processes on this machine, through torchrun (torch.distributed.run); the exit
    status of the first that failed, else 0. Each process gets an equal share of the CPU's threads unless
    OMP_NUM_THREADS says otherwise."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # The processes say what went wrong; torchrun's agent would add its own log lines and report to each failure.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpus // nproc)))
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "nextmm.cli"])
    args.training_script_args = argv  # set apart, since torchrun's parser would read `--nproc` as its own option
    try:
        run(args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        if failure.exitcode == 2:  # a mistake in what the user gave, which the process has said in one sentence
            return 2
        how = f"with exit status {failure.exitcode}" if failure.exitcode > 0 else f"on signal {-failure.exitcode}"
        print(f"nextmm: error: process {rank} of {nproc} failed {how}; its output above says why", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    return 0
