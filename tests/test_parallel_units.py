"""Tensor-parallel grounding is exact: ranks' head shares summed, then thresholded once.

Each TP rank holds some of a layer's heads. The sparsity threshold applies to the average
over all heads, so the plugin sums the ranks' unthresholded shares of each step row's
average (``kernels.step_grounding_ref.step_head_share_rows_ref``) and thresholds the sum
(``core.grounding.ragged_step_stats``). These tests split heads into two groups and check
that this equals ``step_attention_stats`` on all heads, also where entries straddle the
threshold (where thresholding each group on its own would not).
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from specguard_vllm.kernels.step_grounding_ref import (
    step_grounding_stats_ref,
    step_head_share_rows_ref,
)
from specguard_vllm.kernels.testing import make_grounding_case, threshold_margin

from specguard_vllm.core.grounding import ragged_step_stats, step_attention_stats

UNIT = 2.0 ** -12  # dyadic probabilities: head sums and averages are exact in fp32


def causal_counts(gen: torch.Generator, heads: int, prefix: int, n: int, high: int) -> torch.Tensor:
    """Per-head attention rows ``[H, n, prefix + n]`` as multiples of UNIT, causal."""
    counts = torch.randint(0, high + 1, (heads, n, prefix + n), generator=gen).float()
    future = torch.arange(prefix + n) > prefix + torch.arange(n)[:, None]
    return counts.masked_fill(future, 0.0) * UNIT


def padded_group_shares(requests: list[torch.Tensor], heads: slice, total_heads: int):
    """A group's share ``sum_{h in group} p_h / H`` of every request's rows, padded ``[R, K]``."""
    keys = max(p.shape[2] for p in requests)
    rows = [torch.nn.functional.pad(p[heads].sum(0) / total_heads, (0, keys - p.shape[2]))
            for p in requests]
    return torch.cat(rows)


def row_layout(requests: list[torch.Tensor], prefixes: list[int]):
    """Each row's |S| and position in its step."""
    ns = [p.shape[1] for p in requests]
    prefix_lens = torch.tensor([s for s, n in zip(prefixes, ns) for _ in range(n)])
    step_index = torch.tensor([i for n in ns for i in range(n)])
    return prefix_lens, step_index


@settings(max_examples=80, deadline=None)
@given(
    heads=st.sampled_from([2, 4, 8]),
    shapes=st.lists(st.tuples(st.integers(1, 10), st.integers(1, 6)), min_size=1, max_size=3),
    split=st.integers(1, 7),
    sparsity=st.sampled_from([0.0, 0.01, 0.03]),
    scale_high=st.sampled_from([0.25, 1.0, 3.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_summed_group_shares_thresholded_equal_stats_on_all_heads(
        heads, shapes, split, sparsity, scale_high, seed):
    assume(split < heads)
    gen = torch.Generator().manual_seed(seed)
    # Entries spread around the threshold (sparsity / UNIT units), so head averages land
    # on both sides of it and some rows fall below it entirely (scale_high 0.25).
    high = max(int(scale_high * max(sparsity, 0.01) / UNIT), 1)
    layers = []
    for _ in range(2):  # leading dimension: grounding layers
        layers.append([causal_counts(gen, heads, s, n, high) for s, n in shapes])
    prefixes = [s for s, _ in shapes]
    shares = [torch.stack([padded_group_shares(reqs, group, heads) for reqs in layers])
              for group in (slice(0, split), slice(split, heads))]
    prefix_lens, step_index = row_layout(layers[0], prefixes)
    max_step = max(n for _, n in shapes)
    mass, block = ragged_step_stats(shares[0] + shares[1], prefix_lens, step_index, sparsity,
                                    max_step)
    assert mass.shape == (2, len(prefix_lens)) and block.shape == (2, len(prefix_lens), max_step)
    for layer, requests in enumerate(layers):
        row = 0
        for probs, prefix in zip(requests, prefixes):
            n = probs.shape[1]
            want_mass, want_block = step_attention_stats(probs, prefix, sparsity)
            torch.testing.assert_close(mass[layer, row: row + n], want_mass, rtol=0, atol=1e-6)
            torch.testing.assert_close(block[layer, row: row + n, :n], want_block, rtol=0,
                                       atol=1e-6)
            assert not block[layer, row: row + n, n:].any()
            row += n


def test_straddling_entries_are_kept_or_dropped_as_the_full_average_says():
    """Two heads, one per rank; the average sits just above / below the threshold while
    each rank's own head is on the other side, so per-rank thresholding is not exact."""
    s = 0.01
    prefix, n = 3, 1
    # Column 0: heads 0.024 / 0 -> average 0.012 >= s (kept), yet rank 1 alone drops it.
    # Column 1: heads 0.004 / 0.012 -> average 0.008 < s (dropped), yet rank 1 keeps it.
    probs = torch.tensor([[[0.024, 0.004, 0.5, 0.472]],
                          [[0.000, 0.012, 0.6, 0.388]]])
    want_mass, want_block = step_attention_stats(probs, prefix, s)
    halves = [padded_group_shares([probs], slice(h, h + 1), 2) for h in (0, 1)]
    prefix_lens, step_index = torch.tensor([prefix]), torch.tensor([0])
    mass, block = ragged_step_stats(halves[0] + halves[1], prefix_lens, step_index, s, n)
    torch.testing.assert_close(mass, want_mass)
    torch.testing.assert_close(block, want_block)
    # Thresholding each rank's own head, then averaging, gives another prefix mass.
    per_rank = [step_attention_stats(probs[h: h + 1], prefix, s)[0] for h in (0, 1)]
    assert abs(float(sum(per_rank) / 2 - want_mass)) > 1e-3


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(st.integers(0, 6), min_size=1, max_size=4),
    ctx=st.integers(1, 40),
    layout=st.sampled_from(["CPU", "NHD"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_paged_rank_shares_summed_equal_the_fused_reference(steps, ctx, layout, seed):
    """The plugin's own TP path on a paged cache: 4 heads / 2 KV heads split over 2 ranks
    (one KV head each, as vLLM shards them), shares summed, thresholded."""
    assume(sum(steps) > 0)
    sparsity = 0.01
    ctxs = [ctx + 3 * b for b in range(len(steps))]
    case = make_grounding_case(steps, ctxs, num_heads=4, num_kv_heads=2, layout=layout,
                               extra_rows=1, q_gain=2.0, seed=seed)
    assume(threshold_margin(case, sparsity) > 1e-6)  # fp32 rounding may flip a tie
    keys = int(case.seq_lens.max())
    total = case.num_step_tokens
    summed = torch.zeros(total, keys)
    for rank in range(2):
        out = torch.full((total + 2, keys + 5), float("nan"))  # stale garbage must be overwritten
        step_head_share_rows_ref(
            case.query[:, 2 * rank: 2 * rank + 2], case.k_view[:, :, rank: rank + 1],
            case.block_table, case.seq_lens, case.cu_step_lens, scale=case.scale, total_heads=4,
            out=out, query_start=case.query_start)
        summed += out[:total, :keys]
    n = torch.tensor(steps)
    prefix_lens = torch.repeat_interleave(case.seq_lens.long() - n, n)
    step_index = torch.arange(total) - torch.repeat_interleave(case.cu_step_lens[:-1].long(), n)
    mass, block = ragged_step_stats(summed, prefix_lens, step_index, sparsity, case.max_step_len)
    want_mass, want_block = step_grounding_stats_ref(*case.args, **case.kwargs(sparsity))
    torch.testing.assert_close(mass, want_mass[:total], rtol=0, atol=1e-5)
    torch.testing.assert_close(block, want_block[:total], rtol=0, atol=1e-5)


def test_two_rank_captures_reduced_by_the_verifier_equal_one_rank(monkeypatch):
    """The plugin's wiring: two ranks' captures (half the heads, one KV head each) fill their
    TP buffers; the verifier's one all_reduce (a fake group summing both ranks' buffers) and
    rollout give every rank the G_min of a TP=1 capture holding all heads. A long prefill
    without drafts in the batch widens nothing."""
    from types import SimpleNamespace

    import vllm.distributed

    from specguard_vllm.plugin.grounding_capture import GroundingCapture, TensorParallelRows
    from specguard_vllm.plugin.verifier import SpecGuardRejectionSampler

    layers = {"model.layers.0.attn": 0, "model.layers.1.attn": 1}
    steps, ctxs, step_lens = [3, 0, 5, 2], [30, 200, 9, 61], [3, 0, 4, 2]
    case = make_grounding_case(steps, ctxs, num_heads=4, num_kv_heads=2, layout="CPU",
                               extra_rows=1, q_gain=2.0, seed=3)
    n = torch.tensor(steps, dtype=torch.int32)
    qsl = torch.cat([torch.zeros(1, dtype=torch.int32), (case.query_start + n).to(torch.int32)])
    metadata = SimpleNamespace(query_start_loc=qsl, seq_lens=case.seq_lens,
                               block_table=case.block_table)
    impl = SimpleNamespace(head_size=case.query.shape[2], scale=case.scale)

    def filled(capture, query, kv_cache, widest=None):
        capture.arm(steps, widest)
        for name in layers:
            capture.on_attention(name, impl, query, kv_cache, metadata)
        assert capture.complete_for(steps)
        return capture

    whole = filled(GroundingCapture(layers, 0.01, "CPU_ATTN"), case.query, case.kv_cache)
    ranks = [filled(GroundingCapture(layers, 0.01, "CPU_ATTN",
                                     TensorParallelRows(2, 2, 64, 512, torch.device("cpu"))),
                    case.query[:, 2 * r: 2 * r + 2], case.kv_cache[:, r: r + 1])
             for r in range(2)]
    widest_step_context = max(c + s for c, s in zip(ctxs, steps) if s)
    assert all(c.tensor_parallel.rows.shape == (2, sum(steps), widest_step_context) for c in ranks)
    # Given the host's bound of that context (the engine's optimistic lengths), the buffer
    # takes it without reading the device, and a wider bound only pads keys with zeros.
    padded = filled(GroundingCapture(layers, 0.01, "CPU_ATTN",
                                     TensorParallelRows(2, 2, 64, 512, torch.device("cpu"))),
                    case.query[:, :2], case.kv_cache[:, :1], widest=widest_step_context + 7)
    assert padded.tensor_parallel.rows.shape == (2, sum(steps), widest_step_context + 7)
    torch.testing.assert_close(padded.tensor_parallel.rows[..., :widest_step_context],
                               ranks[0].tensor_parallel.rows, rtol=0, atol=0)
    assert not padded.tensor_parallel.rows[..., widest_step_context:].any()
    total = ranks[0].tensor_parallel.rows + ranks[1].tensor_parallel.rows
    reductions = []

    class Group:
        def all_reduce(self, rows):
            reductions.append(rows.shape)
            return total.clone()

    monkeypatch.setattr(vllm.distributed, "get_tp_group", lambda: Group())

    def g_min(capture):
        verifier = SimpleNamespace(metrics=None, state=SimpleNamespace(capture=capture))
        return SpecGuardRejectionSampler._grounding(
            verifier, SimpleNamespace(num_draft_tokens=steps), "cpu", step_lens,
            torch.tensor(steps), torch.tensor(step_lens))

    want = g_min(whole)
    for capture in ranks:
        torch.testing.assert_close(g_min(capture), want, rtol=0, atol=1e-5)
    assert len(reductions) == 2  # one per rank's forward, for both layers at once
    assert want[1] == 1.0 and bool((want[[0, 2, 3]] < 1.0).all())


def test_widest_step_context_is_the_hosts_bound_over_the_requests_with_drafts():
    """The TP buffer's width comes from vLLM's host ``optimistic_seq_lens_cpu`` of the
    requests with drafts (a long prefill without drafts adds none); without that array the
    capture falls back to reading the device."""
    from types import SimpleNamespace

    from specguard_vllm.plugin.runner_state import SpecGuardRunnerState

    state = SpecGuardRunnerState.__new__(SpecGuardRunnerState)
    state.runner = SimpleNamespace(
        optimistic_seq_lens_cpu=torch.tensor([33, 4000, 14, 63, 0, 0], dtype=torch.int32))
    assert state._widest_step_context([3, 0, 5, 2]) == 63
    assert state._widest_step_context([0, 0, 0, 0]) == 0
    state.runner = SimpleNamespace()
    assert state._widest_step_context([3, 0]) is None
