"""ABGV: attention-based grounding of a step, by rollout over the last layers.

SPECGUARD.md section 3. Per layer we only need, for each step query row i,
the prefix mass ``sum_{j in S} A[i, j]`` and the small in-step block
``A[i, step_j]`` of the head-averaged, sparsified, renormalised attention.
The rollout recursion over layers then gives each step token's grounding
without ever forming an N x N matrix. The Triton kernel in ``kernels/``
produces exactly these two statistics from vLLM's paged K cache.
"""

from __future__ import annotations

import torch

RESIDUAL_WEIGHT = 0.5


def step_attention_stats(
    probs: torch.Tensor, prefix_len: int, sparsity: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer statistics of one step from dense attention probabilities.

    Args:
        probs: ``[H, n, N]`` attention probabilities of the step's n query rows
            over all N = prefix_len + n keys (causal: row i sees keys < prefix_len + i + 1).
        prefix_len: |S|, the number of context positions before the step.
        sparsity: entries of the head-averaged row below this are dropped.

    Returns:
        ``(prefix_mass [n], block [n, n])`` of the head-averaged, sparsified,
        row-renormalised attention, *before* the 0.5 residual is added.
        ``block`` is lower triangular (row i, column j = step position j <= i).
    """
    if probs.dim() != 3:
        raise ValueError(f"probs must be [heads, step, keys], got shape {tuple(probs.shape)}")
    _, n, num_keys = probs.shape
    if num_keys != prefix_len + n:
        raise ValueError(f"keys ({num_keys}) != prefix_len ({prefix_len}) + step length ({n})")
    normed = sparsify_rows(probs.float().mean(dim=0), sparsity)  # [n, N]
    prefix_mass = normed[:, :prefix_len].sum(dim=-1)
    block = torch.tril(normed[:, prefix_len:])
    return prefix_mass, block


def sparsify_rows(avg: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Head-averaged attention rows ``[..., keys]`` with entries below ``sparsity`` dropped
    and each row renormalised (fp32): the one definition of SPECGUARD.md section 3's
    thresholding, for one request's dense rows and for a tensor-parallel batch's padded ones
    (zero padding past a row's keys changes nothing: it is dropped or adds nothing).
    """
    avg = avg.float()
    kept = torch.where(avg >= sparsity, avg, torch.zeros_like(avg))
    total = kept.sum(dim=-1, keepdim=True)
    # A row whose every entry fell below the threshold keeps its unsparsified
    # distribution: dropping all mass would make grounding undefined.
    kept = torch.where(total > 0, kept, avg)
    total = kept.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return kept / total


def ragged_step_stats(
    avg: torch.Tensor, prefix_lens: torch.Tensor, step_index: torch.Tensor, sparsity: float,
    max_step_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``step_attention_stats`` of many requests' step rows at once, from padded head averages.

    Args:
        avg: ``[..., R, K]`` head-averaged attention of R step rows (any leading dims, e.g.
            layers); row r's keys are its first ``prefix_lens[r] + step_index[r] + 1``
            columns, every later column is zero.
        prefix_lens: ``[R]`` |S| of each row's request.
        step_index: ``[R]`` position i of each row in its step.
        max_step_len: width of the returned block.

    Returns ``(prefix_mass [..., R], block [..., R, max_step_len])``: row r equals row i of
    ``step_attention_stats`` on its request (block columns past i are zero).
    """
    normed = sparsify_rows(avg, sparsity)
    num_keys = normed.shape[-1]
    device = normed.device
    prefix_lens = prefix_lens.to(device=device, dtype=torch.int64).unsqueeze(-1)  # [R, 1]
    step_index = step_index.to(device=device, dtype=torch.int64).unsqueeze(-1)
    in_prefix = torch.arange(num_keys, device=device) < prefix_lens  # [R, K]
    prefix_mass = torch.where(in_prefix, normed, torch.zeros_like(normed)).sum(dim=-1)
    j = torch.arange(max_step_len, device=device)
    # Clamped columns are only read where j > i, which the causal mask zeroes.
    columns = (prefix_lens + j).clamp(max=max(num_keys - 1, 0))  # [R, max_step_len]
    block = normed.gather(-1, columns.expand(*normed.shape[:-1], max_step_len))
    block = torch.where(j <= step_index, block, torch.zeros_like(block))
    return prefix_mass, block


def _rollout(prefix_mass: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """The rollout recursion of SPECGUARD.md section 3, for a batch of steps: ``[B, n]``.

    ``g^l(i) = sum_{j in S} Â[i,j] + sum_{j in step, j<=i} Â[i,j] g^{l-1}(j)`` with
    ``Â = 0.5 A + 0.5 I`` and ``g^0 = 0`` on the step (S's grounding of 1 is folded
    into the prefix mass). One bmm per layer serves every step of the batch.
    ``prefix_mass [B, m, n]`` and ``block [B, m, n, n]``, lowest layer first.
    """
    batch, m, n = prefix_mass.shape
    eye = torch.eye(n, dtype=torch.float32, device=prefix_mass.device)
    g = torch.zeros(batch, n, 1, dtype=torch.float32, device=prefix_mass.device)
    for layer in range(m):
        a_hat_block = RESIDUAL_WEIGHT * block[:, layer].float() + (1.0 - RESIDUAL_WEIGHT) * eye
        prefix = RESIDUAL_WEIGHT * prefix_mass[:, layer].float().unsqueeze(-1)
        g = prefix + torch.bmm(a_hat_block, g)
    return g.squeeze(-1).clamp(0.0, 1.0)


def rollout_grounding(prefix_mass: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Grounding g(i) of every token of one step after rolling out m layers: ``[n]`` in [0, 1].

    Args:
        prefix_mass: ``[m, n]`` per layer, lowest of the last m layers first.
        block: ``[m, n, n]`` per layer, the in-step lower-triangular block
            (``step_attention_stats``).
    """
    if prefix_mass.dim() != 2 or block.dim() != 3:
        raise ValueError("prefix_mass must be [layers, n] and block [layers, n, n]")
    m, n = prefix_mass.shape
    if block.shape != (m, n, n):
        raise ValueError(f"block shape {tuple(block.shape)} != {(m, n, n)}")
    return _rollout(prefix_mass.unsqueeze(0), block.unsqueeze(0))[0]


def rollout_grounding_min(
    prefix_mass: torch.Tensor, block: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """ABGV (G_min, the minimum grounding over the step) of a whole batch of ragged steps.

    The verifier runs this on every decode step: one batched rollout for every
    request, with no Python loop and no host sync per request.

    Args:
        prefix_mass: ``[B, m, n_max]`` per request and layer, padded.
        block: ``[B, m, n_max, n_max]`` per request and layer, padded.
        lengths: ``[B]`` step length of each request (0 allowed).

    Returns ``[B]`` float32: ``rollout_grounding(prefix_mass[b, :, :L], block[b, :, :L, :L]).min()``
    for ``L = lengths[b] > 0`` and 1.0 for a row without a step. Entries outside
    each request's lower-triangular ``L x L`` region are masked out, so whatever
    sits in the padding never leaks into a result.
    """
    if prefix_mass.dim() != 3 or block.dim() != 4:
        raise ValueError("prefix_mass must be [batch, layers, n] and block [batch, layers, n, n]")
    b, m, n = prefix_mass.shape
    if block.shape != (b, m, n, n):
        raise ValueError(f"block shape {tuple(block.shape)} != {(b, m, n, n)}")
    if lengths.shape != (b,):
        raise ValueError(f"lengths shape {tuple(lengths.shape)} != {(b,)}")
    device = prefix_mass.device
    lengths = lengths.to(device=device, dtype=torch.int64)
    if n == 0:
        return torch.ones(b, dtype=torch.float32, device=device)
    valid = torch.arange(n, device=device) < lengths.unsqueeze(1)  # [B, n]
    tri = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    valid_block = valid.unsqueeze(2) & valid.unsqueeze(1) & tri  # [B, n, n]
    zero = torch.zeros((), dtype=torch.float32, device=device)
    # where, not a product: padding may hold inf/NaN and must not survive the mask.
    masses = torch.where(valid.unsqueeze(1), prefix_mass.float(), zero)
    blocks = torch.where(valid_block.unsqueeze(1), block.float(), zero)
    g = _rollout(masses, blocks)
    g_min = torch.where(valid, g, torch.full_like(g, float("inf"))).amin(dim=-1)
    return torch.where(lengths > 0, g_min, torch.ones_like(g_min))
