"""Synthetic verification batches in each backend's own cache layout (tests, benchmarks, gpu_check)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_layout import k_cache_view
from .step_grounding_ref import step_head_average

# Physical orders of the per-layer logical [blocks, kv_heads, block_size, 2*D] tensor
# (vLLM's KVCacheLayout members, without the layer axis unless interleaved).
LAYOUTS = ("NHD", "HND", "NHD_INTERLEAVED", "CPU")


@dataclass
class GroundingCase:
    query: torch.Tensor  # [T, H, D]; step rows at query_start[b] ...
    kv_cache: torch.Tensor  # logical [blocks, kv_heads, block_size, 2*D]
    k_view: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    cu_step_lens: torch.Tensor
    query_start: torch.Tensor
    scale: float
    max_step_len: int

    @property
    def num_step_tokens(self) -> int:
        return int(self.cu_step_lens[-1])

    @property
    def args(self) -> tuple[torch.Tensor, ...]:
        """The positional arguments of a grounding call on this batch."""
        return (self.query, self.k_view, self.block_table, self.seq_lens, self.cu_step_lens)

    def kwargs(self, sparsity: float, **extra) -> dict:
        """Its keyword arguments: this batch's scale, step bound and query rows, plus ``extra``."""
        return {"scale": self.scale, "sparsity": sparsity, "max_step_len": self.max_step_len,
                "query_start": self.query_start, **extra}


def alloc_kv_cache(num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
                   layout: str, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, str]:
    """(logical kv_cache, backend name) with the physical order of ``layout``."""
    c = 2 * head_dim
    if layout == "NHD":  # LBNHC, vLLM's default on Hopper (FlashAttention, Triton, FlashInfer)
        phys = torch.zeros(num_blocks, block_size, num_kv_heads, c, dtype=dtype, device=device)
        return phys.permute(0, 2, 1, 3), "FLASH_ATTN"
    if layout == "HND":  # LBHNC, FlashInfer on Blackwell
        return torch.zeros(num_blocks, num_kv_heads, block_size, c, dtype=dtype,
                           device=device), "FLASHINFER"
    if layout == "NHD_INTERLEAVED":  # BLNHC: blocks outermost, 2 layers interleaved
        phys = torch.zeros(num_blocks, 2, block_size, num_kv_heads, c, dtype=dtype, device=device)
        return phys[:, 1].permute(0, 2, 1, 3), "TRITON_ATTN"
    if layout == "CPU":
        return torch.zeros(num_blocks, num_kv_heads, block_size, c, dtype=dtype,
                           device=device), "CPU_ATTN"
    raise ValueError(f"unknown layout {layout!r}")


def make_grounding_case(
    step_lens: list[int],
    ctx_lens: list[int],
    *,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    layout: str = "NHD",
    device: str = "cpu",
    max_step_len: int | None = None,
    extra_rows: int = 0,
    q_gain: float = 1.0,
    seed: int = 0,
) -> GroundingCase:
    """A ragged batch: request b has ``ctx_lens[b]`` context keys then ``step_lens[b]`` step tokens.

    Blocks are assigned in a random order (so the block table matters) and
    ``extra_rows`` non-step query rows (a prefill's, say) precede every step.
    """
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in zip(ctx_lens, step_lens)]
    blocks_per = [-(-s // block_size) for s in seq_lens]
    max_blocks = max(max(blocks_per), 1)
    num_blocks = sum(blocks_per) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    at = 0
    for b, nb in enumerate(blocks_per):
        table[b, :nb] = perm[at: at + nb].int()
        at += nb
    kv_cache, backend = alloc_kv_cache(num_blocks, num_kv_heads, block_size, head_dim, layout,
                                       dtype, device)
    k_view = k_cache_view(kv_cache, backend, head_dim)
    # Fill every slot (also unused ones: stale keys must not leak into the result).
    k_view.copy_(torch.randn(k_view.shape, generator=gen).to(dtype))
    rows, q_start, cu = [], [], [0]
    for n in step_lens:
        rows.append(torch.randn(extra_rows + n, num_heads, head_dim, generator=gen) * q_gain)
        q_start.append(sum(r.shape[0] for r in rows[:-1]) + extra_rows)
        cu.append(cu[-1] + n)
    query = torch.cat(rows).to(dtype).to(device)
    ints = {"dtype": torch.int32, "device": device}
    return GroundingCase(
        query=query, kv_cache=kv_cache, k_view=k_view, block_table=table.to(device),
        seq_lens=torch.tensor(seq_lens, **ints), cu_step_lens=torch.tensor(cu, **ints),
        query_start=torch.tensor(q_start, **ints), scale=head_dim ** -0.5,
        max_step_len=max_step_len or max(max(step_lens), 1))


def threshold_margin(case: GroundingCase, sparsity: float) -> float:
    """Smallest |head-averaged probability - sparsity| of any step row (fp32).

    Where it is tiny, the kernel and the reference may legitimately keep
    different entries; tests skip such draws.
    """
    margin = float("inf")
    cu, lens, q0 = case.cu_step_lens.tolist(), case.seq_lens.tolist(), case.query_start.tolist()
    for b in range(len(lens)):
        n = cu[b + 1] - cu[b]
        if n == 0:
            continue
        avg = step_head_average(case.query[q0[b]: q0[b] + n], case.k_view, case.block_table[b],
                                lens[b], case.scale)
        margin = min(margin, (avg - sparsity).abs().min().item())
    return margin


def dense_step_probs(step_query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """The slow obvious attention of n step rows: ``softmax(q K^T * scale)``, causal, ``[H, n, L]``.

    ``step_query [n, H, D]`` and ``keys [L, kv_heads, D]`` (the step's own n keys last);
    GQA by repeating each kv head for its group. Tests compare the reference with it.
    """
    n, num_heads = step_query.shape[:2]
    seq_len = keys.shape[0]
    keys = keys.float().repeat_interleave(num_heads // keys.shape[1], dim=1)  # [L, H, D]
    s = torch.einsum("nhd,lhd->hnl", step_query.float(), keys) * scale
    pos = torch.arange(seq_len, device=s.device)
    limit = seq_len - n + torch.arange(1, n + 1, device=s.device)  # row i sees keys < limit[i]
    s = s.masked_fill(pos[None, None, :] >= limit[None, :, None], float("-inf"))
    return torch.softmax(s, dim=-1)


def make_logits_case(num_tokens_per_step: list[int], vocab: int, *, dtype=torch.float32,
                     device: str = "cpu", extra_rows: int = 1, seed: int = 0):
    """Logits with one bonus row after every step (as vLLM lays them out) and the draft tokens."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(num_tokens_per_step)
    logits = (torch.randn(total + extra_rows * len(num_tokens_per_step), vocab, generator=gen) * 3)
    rows, at, cu = [], 0, [0]
    for n in num_tokens_per_step:
        rows.extend(range(at, at + n))
        at += n + extra_rows
        cu.append(cu[-1] + n)
    tokens = torch.randint(0, vocab, (total,), generator=gen)
    ints = {"dtype": torch.int32, "device": device}
    return (logits.to(dtype).to(device), torch.tensor(tokens.tolist(), **ints),
            torch.tensor(cu, **ints), torch.tensor(rows, **ints))
