"""Fused draft sampling: one launch per draft position, no [rows x vocab] tensor written.

``_draft_position_kernel`` (one program per row) streams the row of logits once for an
online max, the normalisers at temperature 1 and at the draft temperature, and the first
argmax; a sampled row streams it a second time for the inverse-CDF search (a tile's
``cumsum`` plus the mass before it). It replaces the reference's ~10 vocabulary-wide ops
(log-softmax, divide, softmax, cumsum, searchsorted, argmax, where, gather) with one kernel,
and ``draft_position_triton`` folds in the rest of a draft position (the uniform's gather,
the greedy mask of rows past their step, the tail stop, the step automaton): one launch
where the reference issues ~20 ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .draft_sampling_ref import DraftRowState, StepTable
from .step_grounding import SUPPORTED_DTYPES, interpreting, require_index_tensors
from .workspace import next_pow2


@triton.jit
def _draft_position_kernel(
        logits_ptr, u_ptr, u_rows_ptr, greedy_ptr, tok_ptr, lp_ptr,
        open_ptr, pushes_ptr, states_ptr, table_ptr, tail_ptr, kept_ptr, below_ptr,
        vocab, s_lr, s_u, u_col, inv_t, table_vocab, end_state,
        SAMPLE: tl.constexpr, HAS_GREEDY: tl.constexpr, U_ROWS: tl.constexpr,
        STEP_GREEDY: tl.constexpr, ADVANCE: tl.constexpr, TAIL: tl.constexpr,
        TAIL_IN_STEP: tl.constexpr, BLOCK_V: tl.constexpr):
    """Row r of one draft position: its token (the first argmax, or the first id whose
    tempered CDF reaches u * total) and that token's temperature-1 log-prob; then its
    state moved on as ``update_rows_ref`` moves it (tail kept / stopped, automaton step).

    SAMPLE: rows not greedy are drawn (else every row takes the argmax); HAS_GREEDY: a
    per-row greedy flag; U_ROWS: the row's uniform is ``u[u_rows[r] * s_u + u_col]``
    (else ``u[r * s_u + u_col]``); STEP_GREEDY: a row past its step's end (``open`` False)
    is greedy too; ADVANCE: the step automaton takes the token; TAIL: tails stop below
    ``below[r]``; TAIL_IN_STEP: a token inside the step never stops the row.
    """
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
    in_step = tl.full([], 1, tl.int32)
    if STEP_GREEDY or TAIL_IN_STEP or ADVANCE:
        in_step = tl.load(open_ptr + r).to(tl.int32)
    greedy = tl.full([], 0, tl.int32)
    if HAS_GREEDY:
        greedy = tl.load(greedy_ptr + r).to(tl.int32)
    if STEP_GREEDY:
        greedy = greedy | (1 - in_step)
    if SAMPLE:
        if greedy == 0:
            if U_ROWS:
                u_at = tl.load(u_rows_ptr + r).to(tl.int64) * s_u + u_col
            else:
                u_at = r * s_u + u_col
            target = tl.load(u_ptr + u_at).to(tl.float32) * total
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
    lp = x_tok - lse
    tl.store(tok_ptr + r, token.to(tl.int64))
    tl.store(lp_ptr + r, lp)
    if TAIL:
        growing = tl.load(tail_ptr + r).to(tl.int32)
        tl.store(kept_ptr + r, tl.load(kept_ptr + r) + growing)
        confident = (lp >= tl.load(below_ptr + r)).to(tl.int32)
        if TAIL_IN_STEP:
            confident = confident | in_step
        tl.store(tail_ptr + r, (growing & confident) != 0)
    if ADVANCE:
        state = tl.load(table_ptr + tl.load(states_ptr + r) * table_vocab + token)
        tl.store(states_ptr + r, state)
        still_open = state != end_state
        tl.store(open_ptr + r, still_open)
        tl.store(pushes_ptr + r, tl.load(pushes_ptr + r) + still_open.to(tl.int64))


def _block_v(vocab: int, block_v: int | None) -> int:
    return block_v or (min(next_pow2(vocab), 16384) if interpreting() else 1024)


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2 or (logits.stride(1) != 1 and logits.shape[1] > 1):
        raise ValueError(f"logits must be [rows, vocab] with unit stride over the vocabulary; "
                         f"got shape {tuple(logits.shape)} strides {logits.stride()}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"logits dtype {logits.dtype} not in {SUPPORTED_DTYPES}")


def _launch(logits, tokens, logprobs, *, sample, uniforms=None, u_rows=None, u_stride=1, u_col=0,
            greedy=None, inv_t=1.0, rows=None, table=None, all_open=False, all_tails=False,
            block_v=None):
    """One launch of the kernel; tensors a variant does not read are passed as ``tokens``."""
    n, vocab = logits.shape
    if not n:
        return
    advance = table is not None and not all_tails
    tail = rows is not None and rows.tail_open is not None
    reads_open = rows is not None and not all_tails
    unused = tokens
    _draft_position_kernel[(n,)](
        logits, unused if uniforms is None else uniforms, unused if u_rows is None else u_rows,
        unused if greedy is None else greedy, tokens, logprobs,
        rows.open if reads_open else unused, rows.open_pushes if advance else unused,
        rows.states if advance else unused, table.flat if advance else unused,
        rows.tail_open if tail else unused, rows.kept if tail else unused,
        rows.stop_below if tail else unused,
        vocab, logits.stride(0), u_stride, u_col, inv_t,
        table.vocab if advance else 0, table.end if advance else 0,
        SAMPLE=sample, HAS_GREEDY=greedy is not None, U_ROWS=u_rows is not None,
        STEP_GREEDY=sample and reads_open and not all_open, ADVANCE=advance, TAIL=tail,
        TAIL_IN_STEP=tail and not all_tails, BLOCK_V=_block_v(vocab, block_v), num_warps=4)


def draft_sample_triton(logits: torch.Tensor, uniforms: torch.Tensor,
                        greedy: torch.Tensor | None, *, temperature: float,
                        block_v: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch; same contract as ``draft_sampling_ref.draft_sample_ref``. No host sync."""
    _check_logits(logits)
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0 (greedy rows: pass greedy), got {temperature}")
    rows = logits.shape[0]
    if uniforms.shape != (rows,) or (greedy is not None and greedy.shape != (rows,)):
        raise ValueError(f"uniforms and greedy must have one entry per row ({rows})")
    if greedy is not None and greedy.dtype != torch.bool:
        raise TypeError("greedy must be a bool tensor")
    require_index_tensors(logits.device)
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    uniforms = uniforms.to(torch.float32)  # a strided column stays a view when float32
    _launch(logits, tokens, logprobs, sample=True, uniforms=uniforms,
            u_stride=uniforms.stride(0) if rows else 1,
            greedy=None if greedy is None else greedy.contiguous(), inv_t=1.0 / temperature,
            block_v=block_v)
    return tokens, logprobs


def draft_greedy_triton(logits: torch.Tensor, block_v: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``draft_sampling_ref.draft_greedy_ref``: the kernel with every row greedy, whose
    log-prob is the same bits as a greedy row's at a position where others are sampled."""
    _check_logits(logits)
    tokens = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    _launch(logits, tokens, logprobs, sample=False, block_v=block_v)
    return tokens, logprobs


def draft_position_triton(logits: torch.Tensor, uniforms: torch.Tensor | None,
                          greedy: torch.Tensor | None, rows: DraftRowState,
                          table: StepTable | None, *, temperature: float,
                          u_rows: torch.Tensor | None = None, u_col: int = 0,
                          all_open: bool = False, all_tails: bool = False,
                          block_v: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch for a whole draft position, the tokens and the rows' state; same contract
    as ``draft_sampling_ref.draft_position_ref`` (which issues ~20 ops for it). No host sync."""
    _check_logits(logits)
    n = logits.shape[0]
    sample = temperature > 0.0 and not all_tails
    if sample and (uniforms is None or uniforms.dim() != 2 or uniforms.dtype != torch.float32
                   or (uniforms.stride(1) != 1 and uniforms.shape[1] > 1)):
        raise ValueError("sampled rows need uniforms: a float32 [rows, positions] tensor with "
                         "unit stride over positions")
    if sample and u_rows is None and uniforms.shape[0] != n:
        raise ValueError(f"uniforms must have one row per logits row ({n}) unless u_rows is given")
    for name, t, dtype in (("open", rows.open, torch.bool), ("open_pushes", rows.open_pushes, torch.int64),
                           ("states", rows.states, torch.int64), ("tail_open", rows.tail_open, torch.bool),
                           ("kept", rows.kept, torch.int64), ("stop_below", rows.stop_below, torch.float32),
                           ("greedy", greedy, torch.bool), ("u_rows", u_rows, torch.int64)):
        if t is not None and (t.shape != (n,) or t.dtype != dtype or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous {dtype} tensor of {n} entries")
    if table is not None and not all_tails and rows.states is None:
        raise ValueError("an automaton table needs the rows' states")
    if rows.tail_open is not None and (rows.kept is None or rows.stop_below is None):
        raise ValueError("tail_open needs kept and stop_below")
    require_index_tensors(logits.device, u_rows=u_rows)
    tokens = torch.empty(n, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(n, dtype=torch.float32, device=logits.device)
    _launch(logits, tokens, logprobs, sample=sample, uniforms=uniforms if sample else None,
            u_rows=u_rows if sample else None, u_stride=uniforms.stride(0) if sample else 1,
            u_col=u_col, greedy=greedy if sample else None,
            inv_t=1.0 / temperature if sample else 1.0, rows=rows, table=table,
            all_open=all_open, all_tails=all_tails, block_v=block_v)
    return tokens, logprobs
