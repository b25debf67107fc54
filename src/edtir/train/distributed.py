"""torchrun glue. Ranks come from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK; no
``--local_rank`` flag); NCCL on GPUs, gloo on the CPU. A plain ``edtir train`` is a world of one and touches
no process group. Only rank 0 logs and writes files (``DistInfo.is_main``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UsageError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside torchrun."""
    try:
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise UsageError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"inconsistent ranks from the environment: RANK={rank} WORLD_SIZE={world}")
    return rank, world, local


def setup(device: str = "auto") -> DistInfo:
    """Pick this process's device and join the process group when started by torchrun."""
    rank, world, local = env_ranks()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r} requested but CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    info = DistInfo(rank, world, local, dev)
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, **kwargs)  # env:// (MASTER_ADDR/PORT from torchrun)
    return info


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def mean_across(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average a few scalars over the ranks (for logging)."""
    if not info.enabled or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return dict(zip(values, (t / info.world_size).tolist(), strict=True))


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj``, in rank order (on every rank)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def wrap(module: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DistributedDataParallel over ``module`` when there are several processes (gradients averaged)."""
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(module, device_ids=ids)
