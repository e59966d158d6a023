"""torchrun / DDP plumbing: gloo on CPU, nccl on GPU; a single process needs none of it."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init() -> None:
    """Join the process group when started by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(default_device())
        dist.init_process_group(backend)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(net: torch.nn.Module) -> torch.nn.Module:
    """DDP when distributed. Buffers are the target's frozen tensors (identical everywhere):
    not broadcast each step."""
    if rank_world()[1] == 1:
        return net
    return torch.nn.parallel.DistributedDataParallel(net, broadcast_buffers=False)


def all_reduce_sum(t: torch.Tensor) -> None:
    if rank_world()[1] > 1:
        dist.all_reduce(t)
