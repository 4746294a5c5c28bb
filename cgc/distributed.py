"""Distributed plumbing on PyTorch's own engine: torchrun + DistributedDataParallel, NCCL on GPUs
and gloo on CPUs. Everything the training and evaluation loops need to know about processes
lives here: joining the process group, rank and world size, which process writes, sums over
processes and the differentiable gather of the CGC term's negatives.

``torchrun --nproc_per_node N -m cgc.train ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init` joins the group from them (multi-node:
``--nnodes``, ``--rdzv-backend c10d``, ``--rdzv-endpoint``; SLURM: ``srun`` one torchrun per
node). Without them (plain ``python -m cgc.train``) there is one process and no process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import ClassVar

import torch
import torch.distributed as dist

from .errors import ConfigError
from .settings import Settings, setting

NEGATIVES = ("global", "local")
GROUP = "distributed"


@dataclass(frozen=True)
class DistributedConfig(Settings):
    """How a run spreads over torchrun's processes (see each setting's doc)."""

    GROUPS: ClassVar[tuple[str, ...]] = (GROUP,)

    negatives: str = setting(
        "global",
        "InfoNCE negatives under torchrun: the whole global batch, or each process's own share (the authors')",
        GROUP,
        choices=NEGATIVES,
    )
    sync_bn: bool = setting(False, "SyncBatchNorm over the processes (CUDA only)", GROUP)


TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """True in a process started by torchrun (or any launcher that sets its variables)."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def restarted() -> bool:
    """True in a worker that torchrun restarted after a failure (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


@dataclass
class Context:
    """This process's place in the job: ``rank`` of ``world_size`` (``local_rank`` on its node),
    its ``device``, and the process group of the CGC term's gathers (a group of its own, so
    that they never interleave with DistributedDataParallel's gradient all-reduces)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    gather_group: object = field(default=None, repr=False)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def primary(self) -> bool:
        """The one process that writes logs, checkpoints, pictures and progress bars."""
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over processes (``t`` itself for one process)."""
        if not self.distributed:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t

    def sum_values(self, values: dict[str, float]) -> dict[str, float]:
        """Sums over processes of dicts of numbers, in float64; a key some process lacks counts
        as 0 there (a process may have seen no image of a kind)."""
        if not self.distributed:
            return dict(values)
        keys = sorted(set().union(*self.all_gather_object(sorted(values))))
        t = self.all_reduce_sum(
            torch.tensor([float(values.get(k, 0.0)) for k in keys], dtype=torch.float64, device=self.device)
        )
        return dict(zip(keys, t.tolist()))

    def gather(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``(rows of x from every process in rank order, offset of this process's rows)``,
        differentiable: the gradient of the gathered rows goes back to the process that owns
        them, summed over processes (:class:`_GatherRows`). Processes may hold different
        numbers of rows (a batch with unreadable images left out): rows are padded to the
        largest count for the collective and the padding is cut away again."""
        if not self.distributed:
            return x, 0
        count = torch.tensor([x.shape[0]], device=x.device)
        counts = [torch.empty_like(count) for _ in range(self.world_size)]
        dist.all_gather(counts, count, group=self.gather_group)
        sizes = [int(c) for c in counts]
        top = max(sizes)
        padded = x if x.shape[0] == top else torch.cat([x, x.new_zeros((top - x.shape[0], *x.shape[1:]))])
        parts = _GatherRows.apply(padded, self.gather_group, self.world_size, self.rank).chunk(self.world_size)
        rows = torch.cat([part[:n] for part, n in zip(parts, sizes)])
        return rows, sum(sizes[: self.rank])

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_gather_object(self, obj) -> list:
        """``obj`` of every process, in rank order."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any."""
        if not self.distributed:
            return flag
        return bool(self.all_reduce_sum(torch.tensor([float(flag)], device=self.device)).item() > 0)


class _GatherRows(torch.autograd.Function):
    """All-gather along the first dimension; backward: every process's gradient of the
    gathered tensor is summed (reduce-scatter on NCCL; all-reduce then this process's slice on
    gloo, which has no reduce-scatter) and this process keeps the rows it contributed."""

    @staticmethod
    def forward(ctx, x, group, world: int, rank: int):
        ctx.group, ctx.world, ctx.rank = group, world, rank
        x = x.contiguous()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        dist.all_gather(list(out.chunk(world)), x, group=group)  # views of out, written in place
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        n = grad.shape[0] // ctx.world
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            mine = grad.new_empty((n, *grad.shape[1:]))
            dist.reduce_scatter_tensor(mine, grad, group=ctx.group)
        else:
            total = grad.clone()
            dist.all_reduce(total, group=ctx.group)
            mine = total[ctx.rank * n : (ctx.rank + 1) * n]
        return mine, None, None, None


def device_type(name: str) -> str:
    """The kind of device (``cpu``, ``cuda``, ...) that ``--device name`` means, known before
    any process group is joined."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(name).type
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device name (auto, cpu, cuda, cuda:1, ...)") from None


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU (``cuda:LOCAL_RANK``) when CUDA is visible, else the CPU;
    ``cuda``: this process's GPU; a named device must exist."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} but no CUDA device is visible")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"--device {name} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def init(device: str = "auto", *, timeout_s: float = 600) -> Context:
    """Join torchrun's process group (NCCL for CUDA devices, gloo for the CPU) and pick this
    process's device; a single process (not started by torchrun) joins nothing."""
    if not launched():
        return Context(pick_device(device))
    rank, world, local = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if world > 1 and device not in ("auto", "cuda", "cpu"):
        raise ConfigError(
            f"--device {device} names one device, but torchrun started {world} processes: use "
            f"--device cuda (each process takes cuda:LOCAL_RANK) or --device cpu"
        )
    dev = pick_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        dist.init_process_group(
            "nccl" if dev.type == "cuda" else "gloo",
            store=_attempt_store(rank, world, timeout),
            rank=rank,
            world_size=world,
            timeout=timeout,
        )
    group = dist.new_group(list(range(world))) if world > 1 else None
    return Context(dev, rank, world, local, group)


def joined(device: torch.device) -> Context:
    """This process's place in a process group another framework started (the Hugging Face
    ``Trainer`` through accelerate, Lightning), with a gather group of its own for the CGC
    term's negatives; one process without a group. Every process must call it (the gather group
    is created collectively)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Context(device)
    world = dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return Context(device, dist.get_rank(), world, local, dist.new_group(list(range(world))))


def _attempt_store(rank: int, world: int, timeout: timedelta):
    """The launcher's key-value store, under a prefix of this attempt: after torchrun restarts
    its workers (``--max-restarts``) the new processes must not read the addresses the killed
    ones published there (they connect to dead ports and the group fails to form)."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent hosts it
    store = dist.TCPStore(host, port, world, is_master=not agent and rank == 0, timeout=timeout, multi_tenant=not agent)
    return dist.PrefixStore(f"cgc/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def shutdown(ctx: Context) -> None:
    """Leave the process group (a no-op for a single process)."""
    if launched() and dist.is_initialized():
        dist.destroy_process_group()


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This process's share of every global batch: the same images in global batch ``k``
    whatever the number of processes.

    One permutation of the ``n`` samples per (``seed``, ``epoch``) (or the identity without
    ``shuffle``) is cut into global batches of ``batch_size``; process ``rank`` of
    ``world_size`` takes the ``rank``-th equal slice of each. A last partial global batch is
    dropped (``drop_last``, training) or split as evenly as its size allows. ``start`` skips the
    first global batches (resuming in the middle of an epoch).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        start: int = 0,
    ):
        if batch_size % world_size:
            raise ConfigError(
                f"--batch-size {batch_size} is the global batch and must divide evenly over the {world_size} processes"
            )
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world_size
        self.seed, self.epoch, self.shuffle, self.drop_last, self.start = seed, epoch, shuffle, drop_last, start

    def __len__(self) -> int:
        full = self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)
        return max(0, full - self.start)

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=gen).tolist()

    def __iter__(self):
        order = self.order()
        for k in range(self.start, self.start + len(self)):
            batch = order[k * self.batch_size : (k + 1) * self.batch_size]
            share = -(-len(batch) // self.world)
            mine = batch[self.rank * share : (self.rank + 1) * share]
            if mine:
                yield mine
