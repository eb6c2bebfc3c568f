"""PyTorch reference of the grounding kernel (and the CPU path of the dispatch).

Reads each request's keys out of the paged cache, forms the step rows' causal
attention probabilities averaged over heads, and hands them to the core's
``step_attention_stats``, so the kernel is tested against the very definition
the rollout uses. Under tensor parallelism each rank only holds some heads, so it
writes its heads' share of the average instead (``step_head_share_rows_ref``) and the
verifier thresholds the TP group's sum.
"""

from __future__ import annotations

import torch

from specguard_vllm.core.grounding import step_attention_stats

from .kv_layout import gather_keys
from .workspace import GroundingWorkspace


def _paged_scores(q: torch.Tensor, k_view: torch.Tensor, block_row: torch.Tensor,
                  seq_len: int) -> torch.Tensor:
    """``q [kv_heads, rows, D] @ K^T`` over a request's blocks, read in place block by block.

    A gather of K through the block table is a strided index copy and costs
    more than the product itself on CPU; one bmm per block reads each block
    where it lies (for CPU_ATTN the block is already K^T, [D, block_size]).
    """
    block_size = k_view.shape[1]
    if k_view.is_cuda:  # on a GPU one gather and one bmm beat thousands of tiny bmms
        keys = gather_keys(k_view, block_row, seq_len).to(torch.float32)  # [L, kv_heads, D]
        return torch.bmm(q, keys.permute(1, 2, 0))
    k_t = k_view.permute(0, 2, 3, 1)  # [blocks, kv_heads, D, block_size]
    dtype = k_view.dtype
    parts = [torch.bmm(q, k_t[blk].to(torch.float32) if dtype != torch.float32 else k_t[blk])
             for blk in block_row[: -(-seq_len // block_size)].tolist()]
    return torch.cat(parts, dim=-1)[..., :seq_len].contiguous()


def step_head_average(step_query: torch.Tensor, k_view: torch.Tensor, block_row: torch.Tensor,
                      seq_len: int, scale: float, total_heads: int | None = None) -> torch.Tensor:
    """Head-averaged causal attention ``[n, seq_len]`` (fp32) of one request's n step rows.

    ``step_query [n, H, D]``; step row i sees keys ``< seq_len - n + i + 1``. The
    average is formed without materialising ``[H, n, seq_len]`` probabilities twice:
    exponentials in place, each head weighted by ``1 / (total_heads * its normaliser)``.
    ``total_heads`` defaults to H; under tensor parallelism it is the layer's head count
    over all ranks, so the result is these heads' share of the average (softmax is per
    head, hence local) and the TP group's sum of the shares is the average.
    """
    n, num_heads = step_query.shape[:2]
    num_kv_heads = k_view.shape[2]
    group = num_heads // num_kv_heads
    # Heads of one kv head are adjacent (head = kv_head * group + g): rows g * n + i.
    q = step_query.float().view(n, num_kv_heads, group, -1).permute(1, 2, 0, 3)
    q = q.reshape(num_kv_heads, group * n, -1)
    scores = _paged_scores(q, k_view, block_row, seq_len).view(num_heads, n, seq_len)
    scores.mul_(scale)
    # Causality only bites on the step's own n columns.
    future = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(1)
    scores[:, :, seq_len - n:].masked_fill_(future, float("-inf"))
    scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
    weights = 1.0 / ((total_heads or num_heads) * scores.sum(dim=-1))  # [H, n]
    return torch.einsum("hnl,hn->nl", scores, weights)


def _step_requests(cu_step_lens: torch.Tensor, seq_lens: torch.Tensor,
                   query_start: torch.Tensor | None):
    """``(b, n, seq_len, first output row, first query row)`` of each request with a step."""
    starts = cu_step_lens[:-1] if query_start is None else query_start
    cu, lens, q_at = cu_step_lens.tolist(), seq_lens.tolist(), starts.tolist()
    for b in range(len(cu) - 1):
        n = cu[b + 1] - cu[b]
        if n:
            yield b, n, lens[b], cu[b], q_at[b]


def step_head_share_rows_ref(
    query: torch.Tensor,
    k_view: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_step_lens: torch.Tensor,
    *,
    scale: float,
    total_heads: int,
    out: torch.Tensor,
    max_step_len: int | None = None,
    query_start: torch.Tensor | None = None,
    workspace: GroundingWorkspace | None = None,
) -> torch.Tensor:
    """This rank's share of every step row's head-averaged attention, before thresholding.

    Tensor parallelism's half of ``step_grounding_stats_ref``: the sparsity threshold
    applies to the average over *all* heads, so ranks cannot threshold their own heads;
    they write ``sum_{local h} p_h / total_heads`` per row, the verifier sums the rows over
    the TP group and thresholds them (``core.grounding.ragged_step_stats``). Same inputs as
    ``step_grounding_stats_ref``; ``out [>= T_step, >= max(seq_lens)]`` fp32 receives row
    ``cu[b] + i`` of request b in columns ``:seq_lens[b]``, zeros after. Returns ``out``.
    ``max_step_len`` (host) and ``workspace`` size the Triton launch; the reference loops
    over the requests instead and reads their lengths to the host.
    """
    for b, n, seq_len, row, q_at in _step_requests(cu_step_lens, seq_lens, query_start):
        out[row: row + n, :seq_len] = step_head_average(
            query[q_at: q_at + n], k_view, block_table[b], seq_len, scale, total_heads)
        out[row: row + n, seq_len:].zero_()
    return out


def step_grounding_stats_ref(
    query: torch.Tensor,
    k_view: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_step_lens: torch.Tensor,
    *,
    scale: float,
    sparsity: float,
    max_step_len: int,
    query_start: torch.Tensor | None = None,
    workspace: GroundingWorkspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per step row: prefix mass and in-step block row of one layer (reference).

    The contract of ``kernels.step_grounding.step_grounding_stats_triton``:
    ``query [T, H, D]`` post-RoPE, ``k_view`` from ``kv_layout.k_cache_view``,
    ``block_table [B, max_blocks]``, ``seq_lens [B]`` (context incl. the step),
    ``cu_step_lens [B+1]`` (step rows of request b are output rows
    ``cu[b]:cu[b+1]``), ``query_start [B]`` (row of ``query`` holding request b's
    first step token; default ``cu_step_lens[:-1]``). Returns ``prefix_mass
    [>= T_step]`` and ``block [>= T_step, max_step_len]`` (fp32; the workspace's,
    written in place, when one is given; columns past a request's step length are zero).
    """
    total = int(cu_step_lens[-1])
    if workspace is None:
        prefix_mass = torch.zeros(total, dtype=torch.float32, device=query.device)
        block = torch.zeros(total, max_step_len, dtype=torch.float32, device=query.device)
    else:
        prefix_mass, block = workspace.prefix_mass, workspace.block
    for b, n, seq_len, row, q_at in _step_requests(cu_step_lens, seq_lens, query_start):
        avg = step_head_average(query[q_at: q_at + n], k_view, block_table[b], seq_len, scale)
        # A head average is the one head whose average step_attention_stats takes.
        pm, blk = step_attention_stats(avg[None], seq_len - n, sparsity)
        prefix_mass[row: row + n] = pm
        block[row: row + n].zero_()
        block[row: row + n, :n] = blk
    return prefix_mass, block
