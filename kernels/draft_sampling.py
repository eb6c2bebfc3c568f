"""Fused draft sampling: one launch per draft position, no [rows x vocab] tensor written.

``_draft_sample_kernel`` (one program per row) streams the row of logits once for an
online max, the normalisers at temperature 1 and at the draft temperature, and the first
argmax; a sampled row streams it a second time for the inverse-CDF search (a tile's
``cumsum`` plus the mass before it). It replaces the reference's ~10 vocabulary-wide ops
(log-softmax, divide, softmax, cumsum, searchsorted, argmax, where, gather) with one kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .step_grounding import SUPPORTED_DTYPES, interpreting, require_index_tensors
from .workspace import next_pow2


@triton.jit
def _draft_sample_kernel(logits_ptr, u_ptr, greedy_ptr, tok_ptr, lp_ptr, vocab, s_lr, inv_t,
                         HAS_GREEDY: tl.constexpr, BLOCK_V: tl.constexpr):
    """Row r: its token (argmax, or the first id whose tempered CDF reaches u * total)
    and that token's temperature-1 log-prob."""
    r = tl.program_id(0).to(tl.int64)
    base = logits_ptr + r * s_lr
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)  # per-lane running max
    s1 = tl.zeros([BLOCK_V], tl.float32)  # per-lane sum of exp(x - m)
    st = tl.zeros([BLOCK_V], tl.float32)  # per-lane sum of exp((x - m) / T)
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)  # per-lane max and its first id
    best_i = tl.full([BLOCK_V], 2147483647, tl.int32)
    for v0 in range(0, vocab, BLOCK_V):
        idx = v0 + offs
        x = tl.load(base + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        s1 = s1 * tl.exp(m - m_use) + tl.exp(x - m_use)
        st = st * tl.exp((m - m_use) * inv_t) + tl.exp((x - m_use) * inv_t)
        m = m_new
        better = x > best  # strictly: a lane keeps its first maximum
        best_i = tl.where(better, idx, best_i)
        best = tl.where(better, x, best)
    mx = tl.max(m, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    lse = mx + tl.log(tl.sum(s1 * tl.exp(m - mx), 0))
    total = tl.sum(st * tl.exp((m - mx) * inv_t), 0)
    top = tl.max(best, 0)
    token = tl.min(tl.where(best == top, best_i, 2147483647), 0)  # the first argmax
    greedy = tl.load(greedy_ptr + r, mask=HAS_GREEDY, other=0).to(tl.int32)
    if greedy == 0:
        target = tl.load(u_ptr + r).to(tl.float32) * total
        before = tl.zeros([], tl.float32)
        hit = tl.full([], 2147483647, tl.int32)
        last = tl.full([], -1, tl.int32)
        for v0 in range(0, vocab, BLOCK_V):
            idx = v0 + offs
            x = tl.load(base + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
            w = tl.exp((x - mx) * inv_t)
            cdf = tl.cumsum(w, 0) + before
            reach = (cdf >= target) & (w > 0.0)
            hit = tl.minimum(hit, tl.min(tl.where(reach, idx, 2147483647), 0))
            last = tl.maximum(last, tl.max(tl.where(w > 0.0, idx, -1), 0))
            before += tl.sum(w, 0)
        # Rounding can leave the target just past the streamed total: the last id with mass.
        token = tl.where(hit < vocab, hit, last)
    x_tok = tl.load(base + token).to(tl.float32)
    tl.store(tok_ptr + r, token.to(tl.int64))
    tl.store(lp_ptr + r, x_tok - lse)


def draft_sample_triton(logits: torch.Tensor, uniforms: torch.Tensor,
                        greedy: torch.Tensor | None, *, temperature: float,
                        block_v: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch; same contract as ``draft_sampling_ref.draft_sample_ref``. No host sync."""
    if logits.dim() != 2 or (logits.stride(1) != 1 and logits.shape[1] > 1):
        raise ValueError(f"logits must be [rows, vocab] with unit stride over the vocabulary; "
                         f"got shape {tuple(logits.shape)} strides {logits.stride()}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"logits dtype {logits.dtype} not in {SUPPORTED_DTYPES}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0 (greedy rows: pass greedy), got {temperature}")
    rows, vocab = logits.shape
    if uniforms.shape != (rows,) or (greedy is not None and greedy.shape != (rows,)):
        raise ValueError(f"uniforms and greedy must have one entry per row ({rows})")
    if greedy is not None and greedy.dtype != torch.bool:
        raise TypeError("greedy must be a bool tensor")
    require_index_tensors(logits.device)
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    block_v = block_v or (min(next_pow2(vocab), 16384) if interpreting() else 1024)
    if rows:
        # The proposer passes a column of its [R, K] draws: a strided view, made dense here.
        uniforms = uniforms.to(torch.float32).contiguous()
        _draft_sample_kernel[(rows,)](
            logits, uniforms, greedy.contiguous() if greedy is not None else uniforms,
            tokens, logprobs, vocab, logits.stride(0), 1.0 / temperature,
            HAS_GREEDY=greedy is not None, BLOCK_V=block_v, num_warps=4)
    return tokens, logprobs


def draft_greedy_triton(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``draft_sampling_ref.draft_greedy_ref`` in the sampling kernel's greedy branch, so a
    tail's log-prob is the same bits as at a position where other rows were sampled."""
    rows = logits.shape[0]
    return draft_sample_triton(
        logits, torch.ones(rows, dtype=torch.float32, device=logits.device),
        torch.ones(rows, dtype=torch.bool, device=logits.device), temperature=1.0)
