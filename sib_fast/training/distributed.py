"""The processes of a ``sib-train`` run: torchrun's environment (DDP over env://) or a single
process, and the sums over them that keep every rank's decisions the same."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.utils.data import Subset


class Dist:
    """torchrun's environment (DDP over env://), or a single process."""

    def __init__(self, device_arg: str | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() if device_arg is None else device_arg == "cuda"
        if use_cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        self.enabled = self.world > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        return self.sum([float(flag)])[0] > 0

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (``[obj]`` in a single process)."""
        if not self.enabled:
            return [obj]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def shard(dataset, d: Dist):
    """This rank's share of ``dataset`` (every world-th item), all of it in a single process."""
    return Subset(dataset, range(d.rank, len(dataset), d.world)) if d.enabled else dataset
