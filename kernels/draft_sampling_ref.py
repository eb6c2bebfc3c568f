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
