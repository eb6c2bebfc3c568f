"""ABGV statistics captured during the target's own verification forward.

The attention backend has just written this step's keys into the paged cache
when its ``impl.forward`` runs, so for the target's last ``grounding_layers``
layers we read the step rows' queries and the paged K cache right there and
reduce them to the two per-layer statistics of SPECGUARD.md section 3 (prefix
mass, in-step block) with ``kernels.dispatch`` (Triton on CUDA, PyTorch on CPU).
No attention map is stored. The verifier rolls the layers out afterwards.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import torch

LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def grounding_layer_names(attention_layer_names, num_layers: int) -> dict[str, int]:
    """Names of the target's last ``num_layers`` attention layers -> position among them.

    Draft-model layers (prefix ``draft_model.``) are never grounding layers.
    """
    indexed = []
    for name in attention_layer_names:
        if name.startswith("draft_model."):
            continue
        match = LAYER_INDEX.search(name)
        if match:
            indexed.append((int(match.group(1)), name))
    indexed.sort()
    if len(indexed) < num_layers:
        raise ValueError(
            f"specguard.grounding_layers is {num_layers} but the target has only "
            f"{len(indexed)} attention layers")
    chosen = indexed[-num_layers:]
    return {name: i for i, (_, name) in enumerate(chosen)}


@dataclass
class StepBatch:
    """Which query rows of the current verification forward are drafted step tokens."""

    num_draft_tokens: list[int]
    prefix_mass: list[torch.Tensor | None] = field(default_factory=list)  # per grounding layer
    block: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.num_draft_tokens)


class GroundingCapture:
    """Armed by the runner for one target forward; filled by the attention hook."""

    def __init__(self, layer_positions: dict[str, int], sparsity: float, backend_name: str):
        self.layer_positions = layer_positions
        self.sparsity = sparsity
        self.backend_name = backend_name
        self.batch: StepBatch | None = None
        self.armed = False
        self.seconds = 0.0  # time spent computing grounding statistics (scorer overhead)

    def arm(self, num_draft_tokens: list[int]) -> None:
        m = len(self.layer_positions)
        self.batch = StepBatch(list(num_draft_tokens), [None] * m, [None] * m)
        self.armed = sum(num_draft_tokens) > 0

    def disarm(self) -> None:
        self.armed = False

    def clear(self) -> None:
        self.batch = None
        self.armed = False

    def complete_for(self, num_draft_tokens: list[int]) -> bool:
        b = self.batch
        return (b is not None and b.num_draft_tokens == list(num_draft_tokens)
                and all(x is not None for x in b.prefix_mass))

    def on_attention(self, layer_name: str, impl, query: torch.Tensor, kv_cache: torch.Tensor,
                     attn_metadata) -> None:
        position = self.layer_positions.get(layer_name)
        if position is None or not self.armed or attn_metadata is None or self.batch is None:
            return
        from kernels.dispatch import k_cache_view, step_grounding_stats

        started = time.perf_counter()
        batch = self.batch
        n = torch.tensor(batch.num_draft_tokens, dtype=torch.int32)
        num_reqs = n.numel()
        qsl = attn_metadata.query_start_loc[: num_reqs + 1].to("cpu", torch.int64)
        query_start = (qsl[1:] - n).to(query.device)
        cu = torch.zeros(num_reqs + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(n, 0)
        k_view = k_cache_view(kv_cache, self.backend_name, impl.head_size)
        prefix_mass, block = step_grounding_stats(
            query, k_view, attn_metadata.block_table[:num_reqs] if hasattr(attn_metadata, "block_table")
            else attn_metadata.block_table_tensor[:num_reqs],
            attn_metadata.seq_lens[:num_reqs], cu.to(query.device),
            scale=float(impl.scale), sparsity=self.sparsity, max_step_len=int(n.max()),
            query_start=query_start,
        )
        batch.prefix_mass[position] = prefix_mass
        batch.block[position] = block
        if query.is_cuda:
            torch.cuda.synchronize(query.device)
        self.seconds += time.perf_counter() - started


# One engine (one model runner) per worker process: the hook finds it here.
ACTIVE: GroundingCapture | None = None
