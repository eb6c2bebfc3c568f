"""ABGV: the O(n^2) rollout recursion equals the explicit N x N attention rollout."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specguard_vllm.core.grounding import (
    rollout_grounding,
    rollout_grounding_min,
    step_attention_stats,
)


def causal_step_probs(gen: torch.Generator, heads: int, prefix: int, n: int, peak: float) -> torch.Tensor:
    """Attention probabilities [H, n, prefix + n] of step rows, causal."""
    scores = torch.randn(heads, n, prefix + n, generator=gen, dtype=torch.float64) * peak
    for i in range(n):
        scores[:, i, prefix + i + 1:] = float("-inf")
    return torch.softmax(scores, dim=-1)


def explicit_normalised_row(probs: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Head-average, drop < sparsity, renormalise: the obvious slow version, [H, n, N] -> [n, N]."""
    avg = probs.double().mean(dim=0)
    out = avg.clone()
    for i in range(avg.shape[0]):
        row = avg[i].clone()
        row[row < sparsity] = 0.0
        if row.sum() == 0:
            row = avg[i].clone()
        out[i] = row / row.sum()
    return out


def explicit_rollout(step_rows: list[torch.Tensor], prefix_rows: list[torch.Tensor], prefix: int) -> torch.Tensor:
    """Full N x N rollout R = Â^(L) ... Â^(L-m+1), g(i) = sum_{j in S} R[i, j]."""
    n = step_rows[0].shape[0]
    size = prefix + n
    rollout = torch.eye(size, dtype=torch.float64)
    for layer_step, layer_prefix in zip(step_rows, prefix_rows):
        a = torch.zeros(size, size, dtype=torch.float64)
        a[:prefix, :prefix] = layer_prefix
        a[prefix:, :] = layer_step
        a_hat = 0.5 * a + 0.5 * torch.eye(size, dtype=torch.float64)
        rollout = a_hat @ rollout  # the newest (upper) layer multiplies from the left
    return rollout[prefix:, :prefix].sum(dim=-1)


@settings(max_examples=60, deadline=None)
@given(
    heads=st.integers(1, 4),
    prefix=st.integers(1, 12),
    n=st.integers(1, 8),
    layers=st.integers(1, 4),
    sparsity=st.sampled_from([0.0, 0.01, 0.05, 0.2]),
    peak=st.sampled_from([0.5, 2.0, 6.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_rollout_recursion_equals_full_matrix_product(heads, prefix, n, layers, sparsity, peak, seed):
    gen = torch.Generator().manual_seed(seed)
    step_rows, prefix_rows, masses, blocks = [], [], [], []
    for _ in range(layers):
        probs = causal_step_probs(gen, heads, prefix, n, peak)
        pm, blk = step_attention_stats(probs, prefix, sparsity)
        masses.append(pm)
        blocks.append(blk)
        step_rows.append(explicit_normalised_row(probs, sparsity))
        # Prefix rows: any causal distribution inside S (their grounding is 1 by construction).
        p = torch.rand(prefix, prefix, generator=gen, dtype=torch.float64).tril() + 1e-3 * torch.eye(prefix)
        prefix_rows.append(p / p.sum(dim=-1, keepdim=True))
    fast = rollout_grounding(torch.stack(masses), torch.stack(blocks))
    slow = explicit_rollout(step_rows, prefix_rows, prefix)
    torch.testing.assert_close(fast.double(), slow.clamp(0, 1), atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(prefix=st.integers(1, 10), n=st.integers(1, 6), layers=st.integers(1, 3), seed=st.integers(0, 10**6))
def test_grounding_is_a_probability_and_full_prefix_attention_gives_one(prefix, n, layers, seed):
    gen = torch.Generator().manual_seed(seed)
    masses = torch.rand(layers, n, generator=gen)
    blocks = torch.rand(layers, n, n, generator=gen).tril()
    blocks = blocks / (blocks.sum(-1, keepdim=True) + masses.unsqueeze(-1)) * (1 - 1e-6)
    masses = 1 - blocks.sum(-1)
    g = rollout_grounding(masses, blocks)
    assert ((g >= 0) & (g <= 1)).all()
    # All attention on the prefix in every layer: the first step token is fully grounded
    # after enough layers only through the residual; with mass 1 on S it is 1 - 0.5^m.
    ones = rollout_grounding(torch.ones(layers, n), torch.zeros(layers, n, n))
    torch.testing.assert_close(ones, torch.full((n,), 1 - 0.5 ** layers))


def test_step_attending_only_to_itself_is_ungrounded():
    n, layers = 3, 3
    blocks = torch.eye(n).expand(layers, n, n).clone()
    g = rollout_grounding(torch.zeros(layers, n), blocks)
    assert torch.all(g == 0)
    assert rollout_grounding_min(torch.zeros(1, layers, n), blocks[None], torch.tensor([n])) == 0


def test_sparsity_drops_small_entries_and_renormalises():
    probs = torch.tensor([[[0.70, 0.295, 0.005]]])  # one head, one step row, prefix 2
    pm, blk = step_attention_stats(probs, prefix_len=2, sparsity=0.01)
    torch.testing.assert_close(pm, torch.tensor([1.0]))
    torch.testing.assert_close(blk, torch.tensor([[0.0]]))


def test_stats_refuse_inconsistent_shapes():
    import pytest

    with pytest.raises(ValueError, match="keys"):
        step_attention_stats(torch.rand(2, 3, 9), prefix_len=5, sparsity=0.01)
    with pytest.raises(ValueError):
        rollout_grounding(torch.rand(2, 3), torch.rand(2, 3, 4))


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 6),
    layers=st.integers(1, 4),
    n_max=st.integers(1, 9),
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
)
def test_batched_min_equals_per_request_rollout_and_ignores_padding(batch, layers, n_max, data, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = data.draw(st.lists(st.integers(0, n_max), min_size=batch, max_size=batch))
    # Garbage everywhere first: whatever the padding holds must not reach a result.
    masses = torch.randn(batch, layers, n_max, generator=gen) * 1e3
    blocks = torch.randn(batch, layers, n_max, n_max, generator=gen) * 1e3
    expected = []
    for b, n in enumerate(lengths):
        if n == 0:
            expected.append(1.0)
            continue
        prefix = int(torch.randint(1, 8, (1,), generator=gen))
        for layer in range(layers):
            probs = causal_step_probs(gen, 2, prefix, n, 2.0)
            pm, blk = step_attention_stats(probs, prefix, 0.01)
            masses[b, layer, :n], blocks[b, layer, :n, :n] = pm, blk
        expected.append(float(rollout_grounding(masses[b, :, :n], blocks[b, :, :n, :n]).min()))
    got = rollout_grounding_min(masses, blocks, torch.tensor(lengths))
    assert got.dtype == torch.float32 and got.shape == (batch,)
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=0)


def test_batched_min_refuses_inconsistent_shapes():
    import pytest

    with pytest.raises(ValueError, match="block shape"):
        rollout_grounding_min(torch.rand(2, 3, 4), torch.rand(2, 3, 4, 5), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="lengths shape"):
        rollout_grounding_min(torch.rand(2, 3, 4), torch.rand(2, 3, 4, 4), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError):
        rollout_grounding_min(torch.rand(3, 4), torch.rand(3, 4, 4), torch.tensor([1]))
