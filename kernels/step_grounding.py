"""Grounding statistics of the step rows, straight from vLLM's paged K cache.

Per layer and per step query row i of request b (SPECGUARD.md section 3) we
need the prefix mass and the in-step block row of the head-averaged attention,
sparsified (entries < s dropped) and renormalised. The head average is taken
*before* thresholding, so a key's probability must be known for every head at
once; and each probability needs its head's softmax normaliser over all keys.
Hence two passes over the keys:

1. ``_grounding_pass1`` (grid B x kv_heads x splits): each program owns one
   kv head and one chunk of the context and keeps an online max / sum for the
   ``n x group`` query rows of that kv head (one ``tl.dot`` per key tile).
   The last chunk of a (request, kv head) to finish merges the chunks into
   ``lse`` per (row, head).
2. ``_grounding_pass2`` (grid B x splits): each program walks its chunk tile by
   tile, loops over the kv heads, sums ``exp2(s - lse)`` over the heads into the
   tile's head average, thresholds it and accumulates four row sums (kept and
   unsparsified mass, on the prefix and in total); the columns of the step's own
   keys go to scratch. The request's last chunk to finish adds the splits and
   renormalises.

"Last to finish" is an arrival counter per (request, kv head) / request in the
workspace (``arrive_last``): two launches per layer instead of four, which
matters because the plugin runs them eagerly (PIECEWISE graphs), where each
launch costs host time.

The context is split into ``num_splits`` chunks *at run time* (chunk =
ceil(seq_len / num_splits), rounded to the tile), so the grid depends only on
the batch size and a captured CUDA graph stays valid for any sequence length.
K is read through a strided view (``kv_layout.k_cache_view``) and the block
table, so any backend layout is read in place.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .workspace import GroundingWorkspace, next_pow2

LOG2E = 1.4426950408889634
FLOAT_TINY = 1.1754943508222875e-38
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Globals a @triton.jit body reads must be tl.constexpr (the interpreter does not check this).
LOG2E_C = tl.constexpr(LOG2E)
FLOAT_TINY_C = tl.constexpr(FLOAT_TINY)
S_BLOCK = 32  # splits merged per step of the last program's loop


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    knobs = getattr(triton, "knobs", None)
    return os.environ.get("TRITON_INTERPRET", "0") == "1" or bool(
        knobs is not None and knobs.runtime.interpret
    )


@triton.jit
def _request_chunk(cu_ptr, seq_lens_ptr, b, split, num_splits, BLOCK_N: tl.constexpr):
    """Request b's first step row, step length and seq_len, and the keys [start, end) of its
    chunk ``split`` (chunk = ceil(seq_len / num_splits) rounded up to whole tiles)."""
    row0 = tl.load(cu_ptr + b)
    n = tl.load(cu_ptr + b + 1) - row0
    seq_len = tl.load(seq_lens_ptr + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)
    return row0, n, seq_len, chunk, start, end


@triton.jit
def _step_query_rows(n, group, N_PAD: tl.constexpr, G_PAD: tl.constexpr):
    """Query rows r = i * G_PAD + g of one kv head: step token i, head g of the group."""
    r = tl.arange(0, N_PAD * G_PAD)
    i = r // G_PAD
    g = r % G_PAD
    return i, g, (i < n) & (g < group)


@triton.jit
def _tile_scores(q, k_ptr, bt_row_ptr, pos, pos_ok, kvh, page_size,
                 s_kb, s_kt, s_kh, s_kd, d, d_ok, UPCAST: tl.constexpr):
    """``q @ K[pos]^T`` for one tile of keys gathered through the block table."""
    page = tl.load(bt_row_ptr + pos // page_size, mask=pos_ok, other=0).to(tl.int64)
    base = page * s_kb + (pos % page_size).to(tl.int64) * s_kt + kvh * s_kh
    k = tl.load(k_ptr + base[:, None] + d[None, :] * s_kd,
                mask=pos_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:  # the interpreter computes on raw bf16 bits
        k = k.to(tl.float32)
    return tl.dot(q, tl.trans(k), input_precision="ieee")


@triton.jit
def _load_q(q_ptr, q_row, i, head, row_ok, d, d_ok, s_qt, s_qh, s_qd, UPCAST: tl.constexpr):
    q = tl.load(q_ptr + (q_row + i).to(tl.int64)[:, None] * s_qt + head[:, None] * s_qh
                + d[None, :] * s_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q


@triton.jit
def arrive_last(counter_ptr, expected):
    """True in the one program of ``expected`` that arrives last; it re-arms the counter.

    The barrier orders this program's stores before its release; the acquire makes
    the other programs' stores visible to the last one (loads use ``.cg``, past L1).
    """
    tl.debug_barrier()
    done = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = done == expected - 1
    tl.atomic_xchg(counter_ptr, 0, mask=last, sem="relaxed", scope="gpu")
    return last


@triton.jit
def _grounding_pass1(
    q_ptr, k_ptr, bt_ptr, seq_lens_ptr, cu_ptr, qs_ptr, m_ptr, l_ptr, lse_ptr, cnt_ptr,
    s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_bt, s_mt, s_mh, s_lt,
    scale_log2, page_size, group, num_kv_heads, head_dim, num_splits,
    N_PAD: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, S_BLOCK: tl.constexpr, UPCAST: tl.constexpr,
):
    """Online (max, sum) of one chunk; the last chunk of (request, kv head) merges them into lse."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    row0, n, seq_len, chunk, start, end = _request_chunk(cu_ptr, seq_lens_ptr, b, split,
                                                         num_splits, BLOCK_N)
    if (n <= 0) | (start >= end):
        return
    i, g, row_ok = _step_query_rows(n, group, N_PAD, G_PAD)
    head = kvh * group + g
    d = tl.arange(0, D_PAD)
    d_ok = d < head_dim
    q = _load_q(q_ptr, tl.load(qs_ptr + b), i, head, row_ok, d, d_ok, s_qt, s_qh, s_qd, UPCAST)
    row_lim = seq_len - n + i + 1  # causal: row i sees keys < prefix_len + i + 1
    m_i = tl.full([N_PAD * G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([N_PAD * G_PAD], tl.float32)
    for t0 in range(start, end, BLOCK_N):
        pos = t0 + tl.arange(0, BLOCK_N)
        pos_ok = pos < end
        s = _tile_scores(q, k_ptr, bt_ptr + b * s_bt, pos, pos_ok, kvh, page_size,
                         s_kb, s_kt, s_kh, s_kd, d, d_ok, UPCAST) * scale_log2
        s = tl.where(pos_ok[None, :] & (pos[None, :] < row_lim[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(s - m_use[:, None]), 1)
        m_i = m_new
    part = (row0 + i).to(tl.int64) * s_mt + head * s_mh
    tl.store(m_ptr + part + split, m_i, mask=row_ok)
    tl.store(l_ptr + part + split, l_i, mask=row_ok)
    active = tl.cdiv(seq_len, chunk)
    if arrive_last(cnt_ptr + b * num_kv_heads + kvh, active):
        m_all = tl.full([N_PAD * G_PAD], float("-inf"), tl.float32)
        l_all = tl.zeros([N_PAD * G_PAD], tl.float32)
        for s0 in range(0, active, S_BLOCK):
            sp = s0 + tl.arange(0, S_BLOCK)
            ok = row_ok[:, None] & (sp < active)[None, :]
            off = part[:, None] + sp[None, :]
            m_s = tl.load(m_ptr + off, mask=ok, other=float("-inf"), cache_modifier=".cg")
            l_s = tl.load(l_ptr + off, mask=ok, other=0.0, cache_modifier=".cg")
            m_new = tl.maximum(m_all, tl.max(m_s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_all = l_all * tl.exp2(m_all - m_use) + tl.sum(l_s * tl.exp2(m_s - m_use[:, None]), 1)
            m_all = m_new
        # Every valid row sees at least one key, so l_all > 0 there.
        lse = tl.where(m_all == float("-inf"), 0.0, m_all) + tl.log2(tl.where(row_ok, l_all, 1.0))
        tl.store(lse_ptr + (row0 + i).to(tl.int64) * s_lt + head, lse, mask=row_ok)


@triton.jit
def _head_sum_tile(q_ptr, k_ptr, bt_row_ptr, lse_ptr, q_row, row0, i, g, row_ok, ok, pos, pos_ok,
                   d, d_ok, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_lt, scale_log2,
                   page_size, group, num_kv_heads, N_PAD: tl.constexpr, G_PAD: tl.constexpr,
                   BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """``[N_PAD, BLOCK_N]``: each step token's attention probabilities on one key tile, summed
    over the heads (pass 1's normalisers; 0 where ``ok`` is False). Pass 2 and the TP
    head-share pass both start from it."""
    acc = tl.zeros([N_PAD, BLOCK_N], tl.float32)
    for kvh in range(num_kv_heads):
        head = kvh * group + g
        q = _load_q(q_ptr, q_row, i, head, row_ok, d, d_ok, s_qt, s_qh, s_qd, UPCAST)
        lse = tl.load(lse_ptr + (row0 + i).to(tl.int64) * s_lt + head, mask=row_ok, other=0.0)
        s = _tile_scores(q, k_ptr, bt_row_ptr, pos, pos_ok, kvh, page_size,
                         s_kb, s_kt, s_kh, s_kd, d, d_ok, UPCAST) * scale_log2
        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        acc += tl.sum(tl.reshape(p, [N_PAD, G_PAD, BLOCK_N]), 1)
    return acc


@triton.jit
def _grounding_pass2(
    q_ptr, k_ptr, bt_ptr, seq_lens_ptr, cu_ptr, qs_ptr, lse_ptr, sums_ptr, bk_ptr, ba_ptr,
    pm_ptr, blk_ptr, cnt_ptr,
    s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_bt, s_lt, s_st, s_bkt, s_blt,
    scale_log2, inv_heads, sparsity, page_size, group, num_kv_heads, head_dim, num_splits,
    max_step_len,
    N_PAD: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    S_BLOCK: tl.constexpr, MS_PAD: tl.constexpr, UPCAST: tl.constexpr,
):
    """Head-averaged, thresholded row sums of one chunk; the request's last chunk renormalises."""
    b = tl.program_id(0)
    split = tl.program_id(1)
    row0, n, seq_len, chunk, start, end = _request_chunk(cu_ptr, seq_lens_ptr, b, split,
                                                         num_splits, BLOCK_N)
    if (n <= 0) | (start >= end):
        return
    prefix_len = seq_len - n
    i, g, row_ok = _step_query_rows(n, group, N_PAD, G_PAD)
    row_lim = prefix_len + i + 1
    d = tl.arange(0, D_PAD)
    d_ok = d < head_dim
    q_row = tl.load(qs_ptr + b)
    tok = tl.arange(0, N_PAD)  # step token of each output row
    tok_ok = tok < n
    kept_prefix = tl.zeros([N_PAD], tl.float32)
    kept_total = tl.zeros([N_PAD], tl.float32)
    avg_prefix = tl.zeros([N_PAD], tl.float32)
    avg_total = tl.zeros([N_PAD], tl.float32)
    for t0 in range(start, end, BLOCK_N):
        pos = t0 + tl.arange(0, BLOCK_N)
        pos_ok = pos < end
        ok = row_ok[:, None] & pos_ok[None, :] & (pos[None, :] < row_lim[:, None])
        acc = _head_sum_tile(q_ptr, k_ptr, bt_ptr + b * s_bt, lse_ptr, q_row, row0, i, g, row_ok,
                             ok, pos, pos_ok, d, d_ok, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd,
                             s_lt, scale_log2, page_size, group, num_kv_heads,
                             N_PAD, G_PAD, BLOCK_N, UPCAST)
        avg = acc * inv_heads  # 0 on masked keys
        kept = tl.where(avg >= sparsity, avg, 0.0)
        on_prefix = (pos < prefix_len)[None, :]
        kept_prefix += tl.sum(tl.where(on_prefix, kept, 0.0), 1)
        kept_total += tl.sum(kept, 1)
        avg_prefix += tl.sum(tl.where(on_prefix, avg, 0.0), 1)
        avg_total += tl.sum(avg, 1)
        col = pos - prefix_len  # in-step column of each key
        in_step = tok_ok[:, None] & (col >= 0)[None, :] & pos_ok[None, :]
        off = (row0 + tok).to(tl.int64)[:, None] * s_bkt + col[None, :]
        tl.store(bk_ptr + off, kept, mask=in_step)
        tl.store(ba_ptr + off, avg, mask=in_step)
    row = (row0 + tok).to(tl.int64)
    out = sums_ptr + row * s_st + split * 4
    tl.store(out + 0, kept_prefix, mask=tok_ok)
    tl.store(out + 1, kept_total, mask=tok_ok)
    tl.store(out + 2, avg_prefix, mask=tok_ok)
    tl.store(out + 3, avg_total, mask=tok_ok)
    active = tl.cdiv(seq_len, chunk)
    if arrive_last(cnt_ptr + b, active):
        sum_kp = tl.zeros([N_PAD], tl.float32)
        sum_kt = tl.zeros([N_PAD], tl.float32)
        sum_ap = tl.zeros([N_PAD], tl.float32)
        sum_at = tl.zeros([N_PAD], tl.float32)
        for s0 in range(0, active, S_BLOCK):
            sp = s0 + tl.arange(0, S_BLOCK)
            sp_ok = tok_ok[:, None] & (sp < active)[None, :]
            base = sums_ptr + row[:, None] * s_st + sp[None, :] * 4
            sum_kp += tl.sum(tl.load(base + 0, mask=sp_ok, other=0.0, cache_modifier=".cg"), 1)
            sum_kt += tl.sum(tl.load(base + 1, mask=sp_ok, other=0.0, cache_modifier=".cg"), 1)
            sum_ap += tl.sum(tl.load(base + 2, mask=sp_ok, other=0.0, cache_modifier=".cg"), 1)
            sum_at += tl.sum(tl.load(base + 3, mask=sp_ok, other=0.0, cache_modifier=".cg"), 1)
        # A row with nothing kept keeps its dense distribution (the core's rule).
        use_kept = sum_kt > 0.0
        denom = tl.maximum(tl.where(use_kept, sum_kt, sum_at), FLOAT_TINY_C)
        tl.store(pm_ptr + row, tl.where(use_kept, sum_kp, sum_ap) / denom, mask=tok_ok)
        j = tl.arange(0, MS_PAD)
        cell = row[:, None] * s_bkt + j[None, :]
        step_cell = tok_ok[:, None] & (j < n)[None, :]
        blk_kept = tl.load(bk_ptr + cell, mask=step_cell, other=0.0, cache_modifier=".cg")
        blk_dense = tl.load(ba_ptr + cell, mask=step_cell, other=0.0, cache_modifier=".cg")
        value = tl.where(use_kept[:, None], blk_kept, blk_dense) / denom[:, None]
        tl.store(blk_ptr + row[:, None] * s_blt + j[None, :], value,
                 mask=tok_ok[:, None] & (j < max_step_len)[None, :])


@triton.jit
def _head_share_pass(
    q_ptr, k_ptr, bt_ptr, seq_lens_ptr, cu_ptr, qs_ptr, lse_ptr, out_ptr,
    s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_bt, s_lt, s_ot,
    scale_log2, inv_heads, page_size, group, num_kv_heads, head_dim, num_splits, out_cols,
    N_PAD: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Tensor parallelism's second pass: this rank's heads' share of every step row's head
    average over one chunk of keys, written out unthresholded (``out[row, key]``); the
    verifier sums the ranks' rows, then thresholds. Pass 1 gave each (row, head) its
    normaliser over all keys."""
    b = tl.program_id(0)
    split = tl.program_id(1)
    row0, n, seq_len, chunk, start, end = _request_chunk(cu_ptr, seq_lens_ptr, b, split,
                                                         num_splits, BLOCK_N)
    if (n <= 0) | (start >= end):
        return
    prefix_len = seq_len - n
    i, g, row_ok = _step_query_rows(n, group, N_PAD, G_PAD)
    row_lim = prefix_len + i + 1
    d = tl.arange(0, D_PAD)
    d_ok = d < head_dim
    q_row = tl.load(qs_ptr + b)
    tok = tl.arange(0, N_PAD)  # step token of each output row
    tok_ok = tok < n
    out_row = out_ptr + (row0 + tok).to(tl.int64)[:, None] * s_ot
    for t0 in range(start, end, BLOCK_N):
        pos = t0 + tl.arange(0, BLOCK_N)
        pos_ok = pos < end
        ok = row_ok[:, None] & pos_ok[None, :] & (pos[None, :] < row_lim[:, None])
        acc = _head_sum_tile(q_ptr, k_ptr, bt_ptr + b * s_bt, lse_ptr, q_row, row0, i, g, row_ok,
                             ok, pos, pos_ok, d, d_ok, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd,
                             s_lt, scale_log2, page_size, group, num_kv_heads,
                             N_PAD, G_PAD, BLOCK_N, UPCAST)
        # Never past the buffer's columns (sized from a host bound of the contexts).
        tl.store(out_row + pos[None, :], acc * inv_heads,
                 mask=tok_ok[:, None] & (pos_ok & (pos < out_cols))[None, :])


def require_index_tensors(device: torch.device, **tensors: torch.Tensor | None) -> None:
    """Raise unless every given index tensor is int32/int64 on ``device`` (the kernels load
    them as integers from that device's memory)."""
    for name, t in tensors.items():
        if t is not None and (t.dtype not in (torch.int32, torch.int64) or t.device != device):
            raise TypeError(f"{name} must be an int32/int64 tensor on {device}")


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device, looked up once (it sits on the launch path)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def default_num_splits(batch: int, device: torch.device) -> int:
    """Chunks per request: enough pass-2 programs (batch x splits) to fill every SM twice."""
    if device.type != "cuda":
        return 1
    return max(1, triton.cdiv(2 * sm_count(device), max(1, batch)))


def tile_config(rows: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of a compiled launch: keep the [rows, BLOCK_N] score tile near
    8k fp32 values (the AOT build compiles the same configuration)."""
    block_n = max(16, min(128, 8192 // rows))
    return block_n, (4 if rows * block_n <= 8192 and rows <= 64 else 8)


def _normalisers(query, k_view, block_table, seq_lens, cu_step_lens, *, scale: float,
                 max_step_len: int, query_start, workspace, num_splits, block_n) -> dict:
    """Check one layer's inputs and launch pass 1 (each step row's per-head normaliser over
    every key, into the workspace); returns what the second pass's launch needs."""
    if query.dim() != 3 or k_view.dim() != 4:
        raise ValueError(f"query must be [T, H, D] and k_view [blocks, block_size, kv_heads, D]; "
                         f"got {tuple(query.shape)} and {tuple(k_view.shape)}")
    num_heads, head_dim = query.shape[1], query.shape[2]
    _, page_size, num_kv_heads, k_dim = k_view.shape
    if k_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"query heads/dim ({num_heads}, {head_dim}) do not fit the cache's "
                         f"kv heads/dim ({num_kv_heads}, {k_dim})")
    if query.dtype not in SUPPORTED_DTYPES or k_view.dtype != query.dtype:
        raise TypeError(f"query and K must share one of {SUPPORTED_DTYPES}; "
                        f"got {query.dtype} and {k_view.dtype}")
    batch = seq_lens.numel()
    if block_table.dim() != 2 or block_table.shape[0] < batch or cu_step_lens.numel() != batch + 1:
        raise ValueError(f"block_table {tuple(block_table.shape)} / cu_step_lens "
                         f"{tuple(cu_step_lens.shape)} do not match {batch} sequences")
    require_index_tensors(query.device, block_table=block_table, seq_lens=seq_lens,
                          cu_step_lens=cu_step_lens, query_start=query_start)
    if k_view.device != query.device:
        raise ValueError("query and the K cache must be on one device")
    # Rows are cu[b] + i < cu[batch] <= batch * max_step_len (read on the host: no sync).
    rows = max(1, batch * max(1, max_step_len))
    if workspace is None:
        splits = num_splits or default_num_splits(batch, query.device)
        workspace = GroundingWorkspace.allocate(rows, num_heads, max(1, max_step_len),
                                                max_splits=splits, device=query.device,
                                                max_batch=max(1, batch))
    ws = workspace
    rows = min(rows, ws.max_tokens)
    if ws.num_heads != num_heads or ws.max_step_len < max_step_len or ws.max_batch < batch:
        raise ValueError(f"workspace ({ws.num_heads} heads, step {ws.max_step_len}, batch "
                         f"{ws.max_batch}) does not fit {num_heads} heads, step {max_step_len}, "
                         f"batch {batch}")
    num_splits = num_splits or min(ws.max_splits_for(rows), default_num_splits(batch, query.device))
    if not ws.fits(rows, num_splits, batch, max_step_len):
        raise ValueError(f"num_splits {num_splits} x {rows} rows > the workspace's "
                         f"{ws.split_capacity} (row, split) slots")
    query_start = cu_step_lens[:-1] if query_start is None else query_start
    group = num_heads // num_kv_heads
    g_pad = next_pow2(group)
    n_pad = max(next_pow2(max_step_len), 16 // g_pad if g_pad < 16 else 1)  # tl.dot needs M >= 16
    d_pad = max(16, next_pow2(head_dim))
    # The interpreter pays per tile, not per element: few large tiles.
    default_block_n, num_warps = (256, 4) if interpreting() else tile_config(n_pad * g_pad)
    block_n = block_n or default_block_n
    common = {"N_PAD": n_pad, "G_PAD": g_pad, "D_PAD": d_pad, "BLOCK_N": block_n,
              "UPCAST": interpreting(), "num_warps": num_warps}
    scale_log2 = float(scale) * LOG2E
    cnt_heads = ws.counters[: ws.max_batch * num_heads]
    # Per-(row, split) scratch, viewed densely for this launch's number of splits.
    s_mt, s_mh = num_heads * num_splits, num_splits
    _grounding_pass1[(batch, num_kv_heads, num_splits)](
        query, k_view, block_table, seq_lens, cu_step_lens, query_start, ws.part_max, ws.part_sum,
        ws.lse, cnt_heads,
        *query.stride(), *k_view.stride(), block_table.stride(0), s_mt, s_mh, ws.lse.stride(0),
        scale_log2, page_size, group, num_kv_heads, head_dim, num_splits, S_BLOCK=S_BLOCK,
        **common)
    return {"ws": ws, "batch": batch, "num_splits": num_splits, "query_start": query_start,
            "common": common, "scale_log2": scale_log2, "page_size": page_size, "group": group,
            "num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim}


def step_grounding_stats_triton(
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
    num_splits: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the two grounding kernels for one layer; see ``step_grounding_ref`` for the contract.

    No host synchronisation happens here (only shapes are read), so the call can
    be captured in a CUDA graph; the grid depends on ``seq_lens.numel()`` and
    ``num_splits`` only. Returns ``(workspace.prefix_mass, workspace.block)``:
    rows ``cu[b]:cu[b+1]`` belong to request b, other rows are left untouched.
    """
    p = _normalisers(query, k_view, block_table, seq_lens, cu_step_lens, scale=scale,
                     max_step_len=max_step_len, query_start=query_start, workspace=workspace,
                     num_splits=num_splits, block_n=block_n)
    ws, num_splits, num_heads = p["ws"], p["num_splits"], p["num_heads"]
    cnt_rows = ws.counters[ws.max_batch * num_heads:]
    _grounding_pass2[(p["batch"], num_splits)](
        query, k_view, block_table, seq_lens, cu_step_lens, p["query_start"], ws.lse, ws.row_sums,
        ws.block_kept, ws.block_avg, ws.prefix_mass, ws.block, cnt_rows,
        *query.stride(), *k_view.stride(), block_table.stride(0), ws.lse.stride(0),
        4 * num_splits, ws.block_kept.stride(0), ws.block.stride(0),
        p["scale_log2"], 1.0 / num_heads, float(sparsity), p["page_size"], p["group"],
        p["num_kv_heads"], p["head_dim"], num_splits, ws.max_step_len,
        MS_PAD=next_pow2(ws.max_step_len), S_BLOCK=S_BLOCK, **p["common"])
    return ws.prefix_mass, ws.block


def step_head_share_rows_triton(
    query: torch.Tensor,
    k_view: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_step_lens: torch.Tensor,
    *,
    scale: float,
    total_heads: int,
    out: torch.Tensor,
    max_step_len: int,
    query_start: torch.Tensor | None = None,
    workspace: GroundingWorkspace | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Tensor parallelism's rows for one layer in two launches (pass 1, then the head-share
    pass) and a fill; the contract of ``step_grounding_ref.step_head_share_rows_ref``. No
    host sync and no loop over requests: ``max_step_len`` (host) bounds the steps."""
    if out.dim() != 2 or out.dtype != torch.float32 or out.stride(1) != 1:
        raise ValueError(f"out must be a float32 [rows, keys] tensor with unit stride over keys; "
                         f"got {tuple(out.shape)} {out.dtype}")
    p = _normalisers(query, k_view, block_table, seq_lens, cu_step_lens, scale=scale,
                     max_step_len=max_step_len, query_start=query_start, workspace=workspace,
                     num_splits=num_splits, block_n=block_n)
    out.zero_()  # keys past a request's context, and rows of no step, read as 0
    ws = p["ws"]
    _head_share_pass[(p["batch"], p["num_splits"])](
        query, k_view, block_table, seq_lens, cu_step_lens, p["query_start"], ws.lse, out,
        *query.stride(), *k_view.stride(), block_table.stride(0), ws.lse.stride(0), out.stride(0),
        p["scale_log2"], 1.0 / total_heads, p["page_size"], p["group"], p["num_kv_heads"],
        p["head_dim"], p["num_splits"], out.shape[1], **p["common"])
    return out
