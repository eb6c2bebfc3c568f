"""Fused min-logprob of a step: no [tokens x vocab] log-softmax is ever written.

``_step_logprob_kernel`` (grid steps x max_step_len, one program per draft
position) streams the row of logits once, keeping a running max and rescaled
sum per lane (an online logsumexp), and subtracts it from the draft token's
logit. The step's last position to finish (an arrival counter) takes the
minimum over ``cu[b]:cu[b+1]``: one launch in all. Rows can be picked through ``rows``
(vLLM's ``target_logits_indices``) so the logits need not be gathered first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .step_grounding import (
    LOG2E_C,
    SUPPORTED_DTYPES,
    arrive_last,
    interpreting,
    require_index_tensors,
)
from .workspace import next_pow2


@triton.jit
def _step_logprob_kernel(logits_ptr, rows_ptr, tok_ptr, cu_ptr, lp_ptr, min_ptr, cnt_ptr,
                         vocab, s_lr, HAS_ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
                         N_PAD: tl.constexpr):
    """log p of position j of step b; the step's last position to finish takes the minimum."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    start = tl.load(cu_ptr + b)
    n = tl.load(cu_ptr + b + 1) - start
    if (j == 0) & (n <= 0):
        tl.store(min_ptr + b, 0.0)  # an empty step: finite, and never judged
    if j >= n:
        return
    t = start + j
    if HAS_ROWS:
        row = tl.load(rows_ptr + t).to(tl.int64)
    else:
        row = t.to(tl.int64)
    base = logits_ptr + row * s_lr
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)  # per-lane running max (log2 units)
    s = tl.zeros([BLOCK_V], tl.float32)  # per-lane sum of exp2(x - m)
    for v0 in range(0, vocab, BLOCK_V):
        x = tl.load(base + v0 + offs, mask=v0 + offs < vocab, other=float("-inf"))
        x = x.to(tl.float32) * LOG2E_C
        m_new = tl.maximum(m, x)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp2(m - m_use) + tl.exp2(x - m_use)
        m = m_new
    mx = tl.max(m, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    lse = (mx + tl.log2(tl.sum(s * tl.exp2(m - mx), 0))) / LOG2E_C
    tok = tl.load(tok_ptr + t).to(tl.int64)
    x_tok = tl.load(base + tok, mask=(tok >= 0) & (tok < vocab), other=float("-inf"))
    tl.store(lp_ptr + t, x_tok.to(tl.float32) - lse)
    if arrive_last(cnt_ptr + b, n):
        k = tl.arange(0, N_PAD)
        x = tl.load(lp_ptr + start + k, mask=k < n, other=float("inf"), cache_modifier=".cg")
        tl.store(min_ptr + b, tl.min(x, 0))


def step_min_logprob_triton(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    *,
    max_step_len: int,
    rows: torch.Tensor | None = None,
    token_logprobs: torch.Tensor | None = None,
    min_logprob: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch; same contract as ``min_logprob_ref.step_min_logprob_ref``.

    ``max_step_len`` bounds ``cu[b+1] - cu[b]`` (it sizes the grid and the min's
    tile). No host synchronisation: graph-capturable with static output buffers
    and ``counters`` (int32 zeros, one per step; the kernel leaves them at zero).
    """
    if logits.dim() != 2 or (logits.stride(1) != 1 and logits.shape[1] > 1):
        raise ValueError(f"logits must be [rows, vocab] with unit stride over the vocabulary; "
                         f"got shape {tuple(logits.shape)} strides {logits.stride()}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"logits dtype {logits.dtype} not in {SUPPORTED_DTYPES}")
    num_tokens, num_steps = token_ids.numel(), cu_num_tokens.numel() - 1
    if rows is not None and rows.numel() != num_tokens:
        raise ValueError(f"rows ({rows.numel()}) must give one logits row per token ({num_tokens})")
    if rows is None and logits.shape[0] < num_tokens:
        raise ValueError(f"{num_tokens} tokens but only {logits.shape[0]} rows of logits")
    require_index_tensors(logits.device, token_ids=token_ids, cu_num_tokens=cu_num_tokens,
                          rows=rows)
    if token_logprobs is None:
        token_logprobs = torch.empty(num_tokens, dtype=torch.float32, device=logits.device)
    if min_logprob is None:
        min_logprob = torch.empty(num_steps, dtype=torch.float32, device=logits.device)
    if token_logprobs.numel() < num_tokens or min_logprob.numel() < num_steps:
        raise ValueError("output buffers are smaller than the batch")
    if counters is None:
        counters = torch.zeros(num_steps, dtype=torch.int32, device=logits.device)
    if counters.numel() < num_steps or counters.dtype != torch.int32:
        raise ValueError("counters must be int32 zeros with one slot per step")
    vocab = logits.shape[1]
    block_v = block_v or (min(next_pow2(vocab), 16384) if interpreting() else 2048)
    if num_steps:
        _step_logprob_kernel[(num_steps, max(1, max_step_len))](
            logits, rows if rows is not None else token_ids, token_ids, cu_num_tokens,
            token_logprobs, min_logprob, counters, vocab, logits.stride(0),
            HAS_ROWS=rows is not None, BLOCK_V=block_v, N_PAD=next_pow2(max(max_step_len, 1)),
            num_warps=8)
    return token_logprobs, min_logprob
