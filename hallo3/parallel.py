"""Multi-GPU inference: CFG parallel, a thin layer over `torch.distributed`.

Every denoising step runs the transformer on a batch of 2 guidance rows ([unconditional, conditional]; 3 with separate
audio guidance). With CFG parallel each process computes its share of the rows and the predictions are all-gathered,
so 2 GPUs each do half of every step; everything else (VAE, T5, audio, the sampler) runs identically on every process
from the same seed, so every process ends with the same video. Start one process per GPU:

    torchrun --nproc_per_node 2 your_script.py   # with pipe.to(f"cuda:{local_rank}"); pipe.enable_cfg_parallel()

The processes must form a default process group (`torch.distributed.init_process_group`); NCCL on GPUs, gloo on CPUs.
diffusers' context parallelism (one video's tokens across GPUs) is not wired up for this model yet: see
docs/performance.md ("Multi-GPU").
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class CFGParallel:
    """Which guidance rows this process computes.

    Args:
        rank (`int`), world_size (`int`): this process and the number of processes in `group`.
        group: the process group (the default group when None).
    """

    rank: int
    world_size: int
    group: Any = None

    @classmethod
    def from_default_group(cls) -> "CFGParallel":
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "CFG parallel needs torch.distributed initialised: start with `torchrun --nproc_per_node 2 ...` and "
                "call `torch.distributed.init_process_group()` first."
            )
        return cls(dist.get_rank(), dist.get_world_size())

    def rows(self, num_rows: int) -> slice:
        if num_rows % self.world_size:
            raise ValueError(
                f"CFG parallel splits the {num_rows} guidance rows evenly; {self.world_size} processes cannot. Use "
                f"{num_rows} processes (3 rows with a separate `audio_guidance_scale`, 2 otherwise)."
            )
        share = num_rows // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def split(self, tensor: torch.Tensor, num_rows: int) -> torch.Tensor:
        """This process's rows of a per-row tensor [num_rows, ...]; shared tensors (batch 1) pass unchanged."""
        if tensor.shape[0] != num_rows:
            return tensor
        return tensor[self.rows(num_rows)]

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's rows, in rank order, on every process."""
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts)
