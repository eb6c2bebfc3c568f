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
    the results. The rest is scratch: per-(row, split) softmax statistics and row
    sums, stored flat because the number of splits falls as the batch grows
    (``rows x splits`` stays about ``step x 2 x SMs``), the raw in-step columns,
    and one arrival counter per (request, kv head) and per request, which the
    last program of a request zeroes again, so replays start from zero. Hence one
    workspace serves one launch at a time: give each grounding layer its own, and
    never share one between streams.
    """

    prefix_mass: torch.Tensor
    block: torch.Tensor
    part_max: torch.Tensor  # flat [split_capacity * num_heads]
    part_sum: torch.Tensor
    lse: torch.Tensor
    row_sums: torch.Tensor  # flat [split_capacity * 4]
    block_kept: torch.Tensor
    block_avg: torch.Tensor
    counters: torch.Tensor  # int32 [max_batch * (num_heads + 1)]
    num_heads: int
    max_batch: int

    @classmethod
    def allocate(
        cls,
        max_tokens: int,
        num_heads: int,
        max_step_len: int,
        max_splits: int = 64,
        device: torch.device | str = "cpu",
        max_batch: int | None = None,
    ) -> GroundingWorkspace:
        """Room for ``max_tokens`` step rows split ``max_splits`` ways (more ways for fewer rows)."""
        if min(max_tokens, num_heads, max_step_len, max_splits) < 1:
            raise ValueError("workspace sizes must be >= 1")
        max_batch = max_tokens if max_batch is None else max_batch
        capacity = max_tokens * max_splits

        def zeros(*shape: int, dtype=torch.float32) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(
            prefix_mass=zeros(max_tokens),
            block=zeros(max_tokens, max_step_len),
            part_max=zeros(capacity * num_heads),
            part_sum=zeros(capacity * num_heads),
            lse=zeros(max_tokens, num_heads),
            row_sums=zeros(capacity * 4),
            block_kept=zeros(max_tokens, max_step_len),
            block_avg=zeros(max_tokens, max_step_len),
            counters=zeros(max_batch * (num_heads + 1), dtype=torch.int32),
            num_heads=num_heads,
            max_batch=max_batch,
        )

    @property
    def max_tokens(self) -> int:
        return self.block.shape[0]

    @property
    def max_step_len(self) -> int:
        return self.block.shape[1]

    @property
    def split_capacity(self) -> int:
        """How many (row, split) pairs the scratch holds."""
        return self.row_sums.numel() // 4

    def max_splits_for(self, rows: int) -> int:
        """The most splits ``rows`` step rows can use."""
        return max(1, self.split_capacity // max(1, rows))

    def fits(self, rows: int, splits: int, batch: int, max_step_len: int) -> bool:
        return (rows <= self.max_tokens and rows * splits <= self.split_capacity
                and batch <= self.max_batch and max_step_len <= self.max_step_len)
