"""Data-parallel quantization over `torch.distributed`: which calibration windows a rank
holds, and the few collective operations the engine and the pipeline need.

A process that is not part of an initialised process group is a world of one: every
operation below is then the identity, so the single-process run is the same code with no
communication. A group of one (`torchrun --nproc-per-node 1`) still communicates, so the
collective path can be checked against the plain run on a single device.
"""

from __future__ import annotations

import atexit
import os
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from sliderquant.config import ConfigError

T = TypeVar("T")

# Ranks wait at their first collective while rank 0 alone prepares the run folder (and, in
# the CLI, evaluates the unquantized model), so a launched group waits longer than torch's
# default (10 min for NCCL) before it calls a rank lost.
LAUNCH_TIMEOUT = timedelta(hours=3)


@dataclass(frozen=True)
class Shard:
    """Rows `start`..`stop` (exclusive) of `total` calibration windows."""

    start: int
    stop: int
    total: int

    def __len__(self) -> int:
        return self.stop - self.start

    def local(self, rows: torch.Tensor) -> torch.Tensor:
        """The members of `rows` (global indices) this shard holds, as indices into it."""
        return rows[(rows >= self.start) & (rows < self.stop)] - self.start


def shard(total: int, rank: int, world_size: int) -> Shard:
    """Contiguous blocks, sizes differing by at most one (the first `total % world_size`
    ranks hold one more); a rank may hold none."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return Shard(start, start + base + (rank < extra), total)


class Collective:
    """The ranks of a process group (default: the initialised default group, else this
    process alone) and what they do together.

    Collective buffers live on `device`: the current CUDA device for NCCL, else the host.
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.active else 0
        self.world_size = dist.get_world_size(group) if self.active else 1
        self.backend = str(dist.get_backend(group)) if self.active else None
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if self.backend == "nccl" else torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that writes files and prints."""
        return self.rank == 0

    def shard(self, total: int) -> Shard:
        """This rank's calibration windows out of `total`."""
        return shard(total, self.rank, self.world_size)

    def reduce_gradients(self, loss: torch.Tensor | None, params: list[torch.Tensor]) -> float:
        """Sum `loss` (this rank's share of the batch loss; None when it holds no member of
        the batch) and every parameter's gradient over the ranks, in one all-reduce. A
        parameter no rank has a gradient for keeps none, as in a single process. Returns the
        summed loss, the same number on every rank (non-finite on all if on any)."""
        if not self.active:
            return 0.0 if loss is None else loss.item()
        present = [p.grad is not None for p in params]
        flat = torch.cat([
            (loss.detach().float().reshape(1) if loss is not None
             else torch.zeros(1)).to(self.device),
            torch.tensor(present, dtype=torch.float32, device=self.device),
            *(p.grad.detach().float().reshape(-1).to(self.device) if has
              else torch.zeros(p.numel(), device=self.device)
              for p, has in zip(params, present, strict=True)),
        ])
        dist.all_reduce(flat, group=self.group)
        total, flags = flat[0].item(), flat[1:1 + len(params)].tolist()
        offset = 1 + len(params)
        for p, flag in zip(params, flags, strict=True):
            chunk = flat[offset:offset + p.numel()]
            offset += p.numel()
            p.grad = chunk.view_as(p).to(p.device, p.dtype) if flag else None
        return total

    def sum(self, value: float) -> float:
        """`value` summed over the ranks (the same number on every rank)."""
        if not self.active:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total, group=self.group)
        return total.item()

    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite `tensors` in place with rank 0's values (one broadcast)."""
        tensors = list(tensors)
        if not self.active or not tensors:
            return
        flat = torch.cat([t.detach().float().reshape(-1).to(self.device) for t in tensors])
        dist.broadcast(flat, src=self._global(0), group=self.group)
        offset = 0
        with torch.no_grad():
            for t in tensors:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def gather(self, value: T) -> list[T]:
        """`value` of every rank, in rank order (picklable values)."""
        if not self.active:
            return [value]
        values: list = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.group)
        return values

    def check_same(self, value: str, what: str) -> None:
        """ConfigError on every rank unless all ranks hold the same `value`."""
        values = self.gather(value)
        if len(set(values)) > 1:
            raise ConfigError(f"the ranks disagree on {what} ({', '.join(values)}); launch "
                              "every rank with the same model, settings and data")

    def on_main(self, fn: Callable[[], T], share: bool = True) -> T | None:
        """Run `fn` on rank 0 alone and hand every rank its result (with `share=False`, the
        other ranks get None and the result need not be picklable), or raise its exception
        on every rank (so no rank waits for a partner that has given up)."""
        if not self.active:
            return fn()
        payload: list = [None]
        error = result = None
        if self.is_main:
            try:
                result = fn()
                payload = [(True, result if share else None)]
            except Exception as e:  # handed to every rank, then raised on this one too
                error = e
                payload = [(False, e if _picklable(e) else RuntimeError(f"rank 0: {e!r}"))]
        dist.broadcast_object_list(payload, src=self._global(0), group=self.group)
        ok, value = payload[0]
        if error is not None:
            raise error
        if not ok:
            raise value
        return result if self.is_main else value

    def _global(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank


def _picklable(value: object) -> bool:
    try:
        pickle.loads(pickle.dumps(value))
    except Exception:
        return False
    return True


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launch(device: torch.device) -> torch.device:
    """Join the process group `torchrun` describes in the environment if none is
    initialised yet (a group of one too): NCCL on CUDA, where each rank takes GPU
    LOCAL_RANK, Gloo otherwise. Returns the device this rank computes on. Without
    torchrun, `device`."""
    if (not dist.is_available() or dist.is_initialized()
            or not all(v in os.environ for v in TORCHRUN_VARIABLES)):
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=LAUNCH_TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=LAUNCH_TIMEOUT)
    atexit.register(_leave)
    return device


def _leave() -> None:
    """Leave the group `launch` joined, unless the program already did."""
    if dist.is_initialized():
        dist.destroy_process_group()
