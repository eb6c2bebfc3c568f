"""The draft's per-position randomness: counter-based (keyed) uniforms.

Every row's uniform is a pure function of (request key, candidate, position), so a request
drafts the same candidates whatever else is in the batch and on every rank; the pick that
consumes it (``kernels.dispatch.draft_sample``: a fused Triton kernel on CUDA, the PyTorch
reference elsewhere) is row-wise, so it keeps that.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 tensors of 32-bit values, in 16-bit halves (no overflow)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: a bijection that spreads every input bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def keyed_uniforms(keys: torch.Tensor, candidates: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor:
    """One uniform in (0, 1) per row, a pure function of (request key, candidate, position).

    A counter-based draw (int64 ``[R]`` inputs): no generator state, so a row's number
    never depends on the other rows of the batch, and every rank and device computes
    the same one.
    """
    return uniforms_at(row_streams(keys, candidates), positions)


def row_streams(keys: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The (request key, candidate) part of :func:`keyed_uniforms`' hash chain, ``[R]``:
    fixed for a row over a propose call, so each draft position hashes only its position."""
    h = _fmix32(keys & _MASK32)
    for word in ((keys >> 32) & _MASK32, candidates & _MASK32):
        h = _fmix32(h ^ word)
    return h


def _fmix32_int(x: int) -> int:
    """:func:`_fmix32` of one Python int (the same bits)."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _MASK32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def row_stream(key: int, candidate: int) -> int:
    """:func:`row_streams` of one (key, candidate) on the host: a request's k streams are
    fixed for its life, so the proposer hashes them once per request, not per engine step
    (three hash rounds are ~60 small tensor ops)."""
    h = _fmix32_int(key & _MASK32)
    for word in ((key >> 32) & _MASK32, candidate & _MASK32):
        h = _fmix32_int(h ^ word)
    return h


def uniforms_at(streams: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The rows' uniforms at ``positions``, from their :func:`row_streams`."""
    h = _fmix32(streams ^ (positions & _MASK32))
    return ((h >> 8).to(torch.float32) + 0.5) / float(1 << 24)
