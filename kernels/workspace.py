"""Static buffers of the grounding kernel, allocated once so a CUDA graph can own them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@dataclass
class GroundingWorkspace:
    """Outputs and scratch of one grounding call, sized for the largest batch.

    Every launch reads and writes only these tensors, so the kernels can be
    captured in a CUDA graph and replayed with new seq_lens / block tables.
    ``prefix_mass [max_tokens]`` and ``block [max_tokens, max_step_len]`` are
    the results; the rest is scratch (per-split softmax statistics, per-split
    row sums and the raw in-step columns before renormalisation).
    """

    prefix_mass: torch.Tensor
    block: torch.Tensor
    part_max: torch.Tensor
    part_sum: torch.Tensor
    lse: torch.Tensor
    row_sums: torch.Tensor
    block_kept: torch.Tensor
    block_avg: torch.Tensor

    @classmethod
    def allocate(
        cls,
        max_tokens: int,
        num_heads: int,
        max_step_len: int,
        max_splits: int = 64,
        device: torch.device | str = "cpu",
    ) -> GroundingWorkspace:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.float32, device=device)

        return cls(
            prefix_mass=zeros(max_tokens),
            block=zeros(max_tokens, max_step_len),
            part_max=zeros(max_tokens, num_heads, max_splits),
            part_sum=zeros(max_tokens, num_heads, max_splits),
            lse=zeros(max_tokens, num_heads),
            row_sums=zeros(max_tokens, max_splits, 4),
            block_kept=zeros(max_tokens, max_step_len),
            block_avg=zeros(max_tokens, max_step_len),
        )

    @property
    def max_tokens(self) -> int:
        return self.block.shape[0]

    @property
    def max_step_len(self) -> int:
        return self.block.shape[1]

    @property
    def max_splits(self) -> int:
        return self.part_max.shape[2]

    @property
    def num_heads(self) -> int:
        return self.part_max.shape[1]
