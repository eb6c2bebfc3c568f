"""PyTorch reference of the fused draft-sampling kernel (and the CPU path of the dispatch).

One draft position of the proposer's loop: per row, a token at ``temperature`` drawn by the
row's keyed uniform (inverse CDF), or the argmax for greedy rows, and the token's raw
(temperature 1) log-prob, which the selector's tie-break reads.

Measured on CPU (one thread, 256 rows x 512 ids): the full-vocabulary ``cumsum`` costs
~95 us, ``softmax`` ~53 us. A block-wise pick (block masses, then a scan inside one block)
cut 256 rows to ~240 us from ~310 us but cost ~60 us against ~21 us at 4 rows (twice the
ops, each with a fixed dispatch cost), and switching between the two by batch size would
make a request's draws depend, at float rounding, on the batch. So the reference is one
full scan; on CUDA the fused kernel replaces it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def inverse_cdf_sample(logits: torch.Tensor, u: torch.Tensor, temperature: float) -> torch.Tensor:
    """One id per row of ``logits`` (``[R, V]``) drawn from ``softmax(logits / temperature)``
    by the uniforms ``u`` (``[R]`` in (0, 1]): the first id whose CDF reaches ``u * total``,
    ``[R]``.

    Id ``i`` is drawn for targets in ``(cdf[i-1], cdf[i]]``, so never an id of probability
    0 (its interval is empty), and ``u * total <= total`` always (IEEE rounding is
    monotonic), so a uniform that rounds to 1 (the keyed draws' largest, 1 - 2**-25, does in
    float32) lands on the last id with mass, never past the row: no clamp needed.
    """
    cdf = torch.softmax(logits / temperature, dim=-1).cumsum(dim=-1)
    target = u.unsqueeze(1) * cdf[:, -1:]
    return torch.searchsorted(cdf, target).squeeze(1)


def draft_sample_ref(logits: torch.Tensor, uniforms: torch.Tensor, greedy: torch.Tensor | None,
                     *, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [R] int64, logprobs [R] float32)`` for one draft position.

    Args:
        logits: ``[R, V]`` draft logits (fp32/fp16/bf16; ids of probability 0 at -inf).
        uniforms: ``[R]`` float32 in (0, 1]: each row's keyed draw at this position.
        greedy: ``[R]`` bool, rows that take the argmax (first index among ties); None: none.
        temperature: > 0; the sampled rows draw from ``softmax(logits / temperature)``.
    """
    if logits.dtype != torch.float32:
        logits = logits.float()
    tokens = inverse_cdf_sample(logits, uniforms, temperature)
    if greedy is not None:
        tokens = torch.where(greedy, logits.argmax(dim=-1), tokens)
    return tokens, token_logprobs(logits, tokens)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``[R]``: each row's temperature-1 log-prob of its token (float32 ``logits``)."""
    return torch.log_softmax(logits, dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)


def draft_greedy_ref(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, logprobs)`` of an all-greedy position (every row a tail): what
    :func:`draft_sample_ref` returns for rows set in ``greedy``, by the same ops, so a
    tail's log-prob does not depend on whether other rows were still sampling."""
    if logits.dtype != torch.float32:
        logits = logits.float()
    tokens = logits.argmax(dim=-1)
    return tokens, token_logprobs(logits, tokens)


class DraftRowState(NamedTuple):
    """The draft loop's per-row state that one position updates in place (the proposer's
    ``_LiveRows`` holds it), shared by the fused kernel and this reference."""

    open: torch.Tensor  # [R] bool: the row's step has not ended yet
    open_pushes: torch.Tensor  # [R] int64: its tokens that left the step open
    states: torch.Tensor | None = None  # [R] int64: its step automaton state (None: none)
    tail_open: torch.Tensor | None = None  # [R] bool: its tail still grows (None: never stops)
    kept: torch.Tensor | None = None  # [R] int64: how many of its tokens are kept
    stop_below: torch.Tensor | None = None  # [R] float32: a tail token below this ends it


class StepTable(NamedTuple):
    """The step segmenter's automaton as one flat transition table on the device."""

    flat: torch.Tensor  # [(S + 1) * vocab] int64: next state of (state, token)
    vocab: int
    end: int  # the absorbing state: the step has ended


def update_rows_ref(tokens: torch.Tensor, logprobs: torch.Tensor, rows: DraftRowState,
                    table: StepTable | None, *, all_tails: bool = False) -> None:
    """What one drafted position does to each row's state, in place.

    A row whose tail still grows keeps this token; a tail token of log-prob below the row's
    ``stop_below`` ends its tail (that token kept: Hugging Face's
    assistant_confidence_threshold rule), a step token never does (``open`` is read before
    the automaton moves). Then the automaton takes the token: ``open`` turns False once the
    step has ended (END is absorbing) and ``open_pushes`` counts the tokens that left it
    open, so a row's step end is that count plus one. ``all_tails``: known on the host that
    every row is past its step, so neither the step test nor the automaton runs.
    """
    if rows.tail_open is not None:
        rows.kept.add_(rows.tail_open)
        confident = torch.ge(logprobs, rows.stop_below)
        if not all_tails:
            confident |= rows.open
        rows.tail_open.bitwise_and_(confident)
    if table is not None and not all_tails:
        torch.index_select(table.flat, 0, rows.states * table.vocab + tokens, out=rows.states)
        torch.ne(rows.states, table.end, out=rows.open)
        rows.open_pushes.add_(rows.open)


def draft_position_ref(logits: torch.Tensor, uniforms: torch.Tensor | None,
                       greedy: torch.Tensor | None, rows: DraftRowState, table: StepTable | None,
                       *, temperature: float, u_rows: torch.Tensor | None = None, u_col: int = 0,
                       all_open: bool = False, all_tails: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [R], logprobs [R])`` of one draft position, and the rows' state moved on
    (:func:`update_rows_ref`): the fused kernel does both in one launch.

    A row is drawn at ``temperature`` by its keyed uniform ``uniforms[u_rows[r], u_col]``
    (``u_rows`` None: row r's), unless it is greedy: set in ``greedy`` (SpecGuard off), or
    past its step's end (its tail, as token-level SD drafts). ``all_open``: known on the
    host that no row's step has ended, so only ``greedy`` counts; ``all_tails``: every row
    is past its step (all greedy, no automaton). Temperature 0: every row greedy.
    """
    if all_tails or not temperature > 0.0:
        tokens, logprobs = draft_greedy_ref(logits)
    else:
        if not all_open:
            ended = ~rows.open
            greedy = ended if greedy is None else ended | greedy
        u = uniforms[:, u_col] if u_rows is None else uniforms[u_rows, u_col]
        tokens, logprobs = draft_sample_ref(logits, u, greedy, temperature=temperature)
    update_rows_ref(tokens, logprobs, rows, table, all_tails=all_tails)
    return tokens, logprobs
