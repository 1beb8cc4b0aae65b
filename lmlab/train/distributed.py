"""Processes and seeds: torchrun process groups, DDP/FSDP wrapping, seeding every RNG."""

from __future__ import annotations

import dataclasses
import os
import random

import numpy as np
import torch
from torch import nn


@dataclasses.dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0



def setup_distributed(device_name: str, backend: str = "auto") -> tuple[Dist, str]:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA); returns (dist, device name)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device_name
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device_name = f"cuda:{local_rank}"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)
    return Dist(rank, world, local_rank), device_name



def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)



def wrap_model(model: nn.Module, dist: Dist, strategy: str, compile_model: bool) -> nn.Module:
    """DDP or FSDP under torchrun, then torch.compile if asked. The raw model stays reachable
    through `.module` / `._orig_mod` (lmlab.weights.checkpoint.unwrap), which is what gets saved."""
    if dist.world > 1:
        if strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in model.layers:
                fully_shard(block)
            fully_shard(model)
        else:
            from torch.nn.parallel import DistributedDataParallel

            on_cuda = next(model.parameters()).is_cuda
            model = DistributedDataParallel(model, device_ids=[dist.local_rank] if on_cuda else None)
    return torch.compile(model) if compile_model else model
