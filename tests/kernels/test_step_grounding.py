"""The grounding kernel against its reference (core.grounding.step_attention_stats)."""

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from specguard_vllm.kernels.kv_layout import k_cache_view
from specguard_vllm.kernels.step_grounding import step_grounding_stats_triton
from specguard_vllm.kernels.step_grounding_ref import step_grounding_stats_ref
from specguard_vllm.kernels.testing import (
    LAYOUTS,
    dense_step_probs,
    make_grounding_case,
    threshold_margin,
)
from specguard_vllm.kernels.workspace import GroundingWorkspace

from specguard_vllm.core.grounding import step_attention_stats

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_both(case, sparsity, workspace=None, **launch):
    pm, blk = step_grounding_stats_triton(*case.args,
                                          **case.kwargs(sparsity, workspace=workspace, **launch))
    pr, br = step_grounding_stats_ref(*case.args, **case.kwargs(sparsity))
    t = case.num_step_tokens
    return pm[:t].cpu(), blk[:t].cpu(), pr.cpu(), br.cpu()


def assert_close(case, sparsity, **launch):
    pm, blk, pr, br = run_both(case, sparsity, **launch)
    torch.testing.assert_close(pm, pr, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(blk, br, atol=2e-5, rtol=1e-4)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    num_kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2, 3, 4]),
    head_dim=st.sampled_from([16, 24, 32]),
    block_size=st.sampled_from([8, 16, 32]),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    steps=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 90)), min_size=1, max_size=3),
    sparsity=st.sampled_from([0.0, 0.004, 0.02, 0.2, 1.0]),
    num_splits=st.integers(1, 3),
    block_n=st.sampled_from([16, 64]),
    extra_rows=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference_on_ragged_batches(
    device, num_kv_heads, group, head_dim, block_size, dtype, layout, steps, sparsity,
    num_splits, block_n, extra_rows, seed,
):
    case = make_grounding_case(
        [n for n, _ in steps], [c for _, c in steps], num_heads=num_kv_heads * group,
        num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size, dtype=dtype,
        layout=layout, device=device, extra_rows=extra_rows, q_gain=2.0, seed=seed)
    # A head average within rounding of the threshold may fall either side.
    assume(threshold_margin(case, sparsity) > 1e-5)
    assert_close(case, sparsity, num_splits=num_splits, block_n=block_n)


@pytest.mark.parametrize("dtype", DTYPES)
def test_largest_step_with_gqa8_and_many_splits(device, dtype):
    case = make_grounding_case([32, 5], [70, 0], num_heads=8, num_kv_heads=1, head_dim=64,
                               block_size=16, dtype=dtype, device=device, q_gain=2.0, seed=3)
    assert_close(case, 0.01, num_splits=4, block_n=32)


def test_step_covering_the_whole_context_has_no_prefix_mass(device):
    case = make_grounding_case([4], [0], device=device, seed=1)
    pm, blk, pr, br = run_both(case, 0.0)
    assert torch.allclose(pm, torch.zeros(4)) and torch.allclose(pr, torch.zeros(4))
    torch.testing.assert_close(blk, br, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(blk.sum(-1), torch.ones(4))


def test_row_with_every_entry_below_threshold_keeps_its_dense_distribution(device):
    case = make_grounding_case([3], [200], device=device, seed=2)
    pm, blk, pr, _br = run_both(case, 1.0)
    torch.testing.assert_close(pm, pr, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(pm + blk.sum(-1), torch.ones(3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("seq_extra", [-1, 0, 1])
def test_context_ending_at_and_around_tile_and_block_edges(device, seq_extra):
    # seq_len = 64 + seq_extra against BLOCK_N = 32 and block_size = 16.
    case = make_grounding_case([4], [60 + seq_extra], block_size=16, device=device, seed=4)
    assert_close(case, 0.01, num_splits=2, block_n=32)


def test_reused_workspace_does_not_leak_stale_rows(device):
    ws = GroundingWorkspace.allocate(16, 4, 8, max_splits=4, device=device)
    big = make_grounding_case([8, 8], [150, 90], device=device, max_step_len=8, seed=5)
    run_both(big, 0.01, workspace=ws, num_splits=4, block_n=16)
    small = make_grounding_case([2, 0, 3], [10, 5, 40], device=device, max_step_len=8, seed=6)
    pm, blk, pr, br = run_both(small, 0.01, workspace=ws, num_splits=4, block_n=16)
    torch.testing.assert_close(pm, pr, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(blk, br, atol=2e-5, rtol=1e-4)


def test_more_splits_than_one_merge_tile_and_counters_rearm(device):
    """47 active chunks (> S_BLOCK): the last program's merge loop runs twice; every call
    leaves the arrival counters at zero, so the next call (or graph replay) starts clean."""
    from specguard_vllm.kernels.step_grounding import S_BLOCK

    ws = GroundingWorkspace.allocate(16, 4, 8, max_splits=48, device=device)
    case = make_grounding_case([3, 5], [1500, 300], device=device, max_step_len=8, seed=12)
    for sparsity in (0.01, 0.0):
        pm, blk, pr, br = run_both(case, sparsity, workspace=ws, num_splits=48, block_n=16)
        assert -(-1503 // 32) > S_BLOCK
        torch.testing.assert_close(pm, pr, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(blk, br, atol=2e-5, rtol=1e-4)
        assert int(ws.counters.abs().sum()) == 0


def test_fewer_rows_may_use_more_splits_but_never_overflow_the_scratch(device):
    ws = GroundingWorkspace.allocate(16, 4, 8, max_splits=2, device=device)
    assert ws.max_splits_for(4) == 8 and ws.max_splits_for(64) == 1
    one = make_grounding_case([4], [400], device=device, max_step_len=4, seed=13)
    pm, _blk, pr, _br = run_both(one, 0.01, workspace=ws, num_splits=8, block_n=16)
    torch.testing.assert_close(pm, pr, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="slots"):
        run_both(one, 0.01, workspace=ws, num_splits=9, block_n=16)
    with pytest.raises(ValueError, match="does not fit"):
        run_both(make_grounding_case([4], [40], device=device, max_step_len=12, seed=1),
                 0.01, workspace=ws)


def test_reference_is_core_step_attention_stats_on_dense_probabilities():
    case = make_grounding_case([3], [20], num_heads=2, num_kv_heads=2, block_size=8, seed=7)
    keys = case.k_view[case.block_table[0, :3].long()].reshape(-1, 2, 32)[:23]
    q = case.query[case.query_start[0]: case.query_start[0] + 3]
    want = step_attention_stats(dense_step_probs(q, keys, case.scale), 20, 0.01)
    got = step_grounding_stats_ref(*case.args, **case.kwargs(0.01))
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def _write_keys_like_backend(kv_cache, backend, keys, slots, head_dim):
    """Write keys the way the backend's own cache-update does."""
    if backend == "CPU_ATTN":
        from vllm import _custom_ops as ops

        nb, hkv, bs, _ = kv_cache.shape
        kc, vc = kv_cache.view(nb, hkv, 2 * bs, head_dim).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(keys, torch.zeros_like(keys), kc, vc, slots, "vec")
    else:  # reshape_and_cache_flash writes kv_cache.transpose(1, 2).split(head_size, -1)[0]
        key_cache = kv_cache.transpose(1, 2).split(head_dim, dim=-1)[0]
        bs = key_cache.shape[1]
        key_cache[slots.long() // bs, slots.long() % bs] = keys


@pytest.mark.parametrize("layout", ["NHD", "HND", "NHD_INTERLEAVED", "CPU"])
def test_reads_each_backends_own_cache(device, layout):
    """Keys written by the backend's cache update, checked against the keys themselves."""
    from specguard_vllm.kernels.testing import alloc_kv_cache

    if layout == "CPU":
        pytest.importorskip("vllm._custom_ops")
        if device != "cpu":
            pytest.skip("CPU backend cache lives on the CPU")
    gen = torch.Generator().manual_seed(8)
    hkv, h, d, bs, ctx, n = 2, 4, 32, 16, 45, 3
    seq = ctx + n
    kv_cache, backend = alloc_kv_cache(6, hkv, bs, d, layout, torch.float32, device)
    table = torch.tensor([[4, 1, 5, 0]], dtype=torch.int32, device=device)
    keys = torch.randn(seq, hkv, d, generator=gen).to(device)
    pos = torch.arange(seq, device=device)
    slots = table[0, pos // bs].long() * bs + pos % bs
    _write_keys_like_backend(kv_cache, backend, keys, slots, d)
    k_view = k_cache_view(kv_cache, backend, d)
    q = torch.randn(n, h, d, generator=gen).to(device) * 2
    ints = {"dtype": torch.int32, "device": device}
    args = (q, k_view, table, torch.tensor([seq], **ints), torch.tensor([0, n], **ints))
    kw = {"scale": d ** -0.5, "sparsity": 0.01, "max_step_len": n}
    pm, blk = step_grounding_stats_triton(*args, **kw, num_splits=2, block_n=16)
    want_pm, want_blk = step_attention_stats(dense_step_probs(q, keys, d ** -0.5), ctx, 0.01)
    torch.testing.assert_close(pm[:n], want_pm, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(blk[:n], want_blk, atol=2e-5, rtol=1e-4)


def test_launch_wrapper_rejects_mismatched_inputs(device):
    case = make_grounding_case([2], [10], device=device)
    args = (case.k_view, case.block_table, case.seq_lens, case.cu_step_lens)
    kw = {"scale": 1.0, "sparsity": 0.01, "max_step_len": 2}
    with pytest.raises(TypeError, match="share one of"):
        step_grounding_stats_triton(case.query.half(), *args, **kw)
    with pytest.raises(ValueError, match="do not fit"):
        step_grounding_stats_triton(case.query[:, :3], *args, **kw)
    with pytest.raises(ValueError, match="sequences"):
        step_grounding_stats_triton(case.query, case.k_view, case.block_table, case.seq_lens,
                                    case.cu_step_lens[:1], **kw)
    with pytest.raises(ValueError, match="unknown attention backend"):
        k_cache_view(case.kv_cache, "XFORMERS", 32)


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    num_kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([16, 32]),
    block_size=st.sampled_from([8, 16]),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    steps=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 70)), min_size=1, max_size=3),
    world_size=st.sampled_from([1, 2, 4]),
    num_splits=st.integers(1, 3),
    block_n=st.sampled_from([16, 64]),
    seed=st.integers(0, 2**16),
)
def test_tensor_parallel_head_shares_match_the_reference(
    device, num_kv_heads, group, head_dim, block_size, dtype, layout, steps, world_size,
    num_splits, block_n, seed,
):
    """TP > 1: this rank's heads' share of every step row's head average (pass 1 plus the
    head-share pass, no loop over requests) equals the reference's per-request loop, zeros
    past each row's context included (the buffer comes in dirty)."""
    from specguard_vllm.kernels.step_grounding import step_head_share_rows_triton
    from specguard_vllm.kernels.step_grounding_ref import step_head_share_rows_ref

    case = make_grounding_case(
        [n for n, _ in steps], [c for _, c in steps], num_heads=num_kv_heads * group,
        num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size, dtype=dtype,
        layout=layout, device=device, q_gain=2.0, seed=seed)
    rows, keys = max(case.num_step_tokens, 1), int(case.seq_lens.max()) + 5
    total_heads = num_kv_heads * group * world_size
    kw = dict(scale=case.scale, total_heads=total_heads, query_start=case.query_start)
    want = step_head_share_rows_ref(*case.args, out=torch.full((rows, keys), 7.0, device=device),
                                    **kw)
    got = step_head_share_rows_triton(
        *case.args, out=torch.full((rows, keys), 7.0, device=device),
        max_step_len=case.max_step_len, num_splits=num_splits, block_n=block_n, **kw)
    t = case.num_step_tokens
    torch.testing.assert_close(got[:t].cpu(), want[:t].cpu(), atol=2e-6, rtol=1e-4)
    # Over all the ranks' heads (world_size copies of these) a row sums to 1 on its keys.
    if t:
        torch.testing.assert_close(got[:t].sum(-1).cpu() * world_size,
                                   torch.ones(t), atol=1e-4, rtol=1e-4)
