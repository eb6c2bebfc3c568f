"""The fused min-logprob kernel against its reference."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from specguard_vllm.kernels.min_logprob import step_min_logprob_triton
from specguard_vllm.kernels.min_logprob_ref import step_min_logprob_ref
from specguard_vllm.kernels.testing import make_logits_case


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    steps=st.lists(st.integers(0, 8), min_size=1, max_size=4),
    vocab=st.sampled_from([1, 7, 100, 1000, 5003]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    use_rows=st.booleans(),
    block_v=st.sampled_from([16, 256, None]),
    mask_vocab=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference(device, steps, vocab, dtype, use_rows, block_v, mask_vocab,
                                  seed):
    logits, tokens, cu, rows = make_logits_case(steps, vocab, dtype=dtype, device=device,
                                                extra_rows=1 if use_rows else 0, seed=seed)
    if mask_vocab and vocab > 2:  # a logits processor's -inf on part of the vocabulary
        logits[:, 1::2] = float("-inf")
        tokens = tokens - tokens % 2
    rows = rows if use_rows else None
    lp, mn = step_min_logprob_triton(logits, tokens, cu, max_step_len=8, rows=rows,
                                     block_v=block_v)
    lp_ref, mn_ref = step_min_logprob_ref(logits, tokens, cu, rows=rows)
    torch.testing.assert_close(lp.cpu(), lp_ref.cpu(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(mn.cpu(), mn_ref.cpu(), atol=2e-5, rtol=1e-5)


def test_empty_step_has_min_zero_and_min_is_the_smallest_token(device):
    logits = torch.zeros(3, 4, device=device)
    logits[1, 2] = -5.0
    tokens = torch.tensor([0, 2, 1], dtype=torch.int32, device=device)
    cu = torch.tensor([0, 0, 3], dtype=torch.int32, device=device)
    lp, mn = step_min_logprob_triton(logits, tokens, cu, max_step_len=3)
    assert mn[0].item() == 0.0
    assert mn[1].item() == pytest.approx(lp[1].item())
    assert lp[1].item() == pytest.approx(-5.0 - torch.logsumexp(logits[1], 0).item(), abs=1e-5)


def test_launch_wrapper_rejects_bad_inputs(device):
    logits, tokens, cu, rows = make_logits_case([2], 10, device=device)
    with pytest.raises(ValueError, match="unit stride"):
        step_min_logprob_triton(logits.t(), tokens, cu, max_step_len=2)
    with pytest.raises(TypeError, match="token_ids"):
        step_min_logprob_triton(logits, tokens.float(), cu, max_step_len=2)
    with pytest.raises(ValueError, match="one logits row per token"):
        step_min_logprob_triton(logits, tokens, cu, max_step_len=2, rows=rows[:1])


def test_static_counters_are_rearmed_for_the_next_call(device):
    """Graph replays reuse one counter buffer: each call must leave it at zero."""
    counters = torch.zeros(3, dtype=torch.int32, device=device)
    for steps, seed in (([3, 0, 5], 1), ([1, 4, 2], 2), ([5, 5, 5], 3)):
        logits, tokens, cu, rows = make_logits_case(steps, 300, device=device, seed=seed)
        _lp, mn = step_min_logprob_triton(logits, tokens, cu, max_step_len=5, rows=rows,
                                         counters=counters)
        _, mn_ref = step_min_logprob_ref(logits, tokens, cu, rows=rows)
        torch.testing.assert_close(mn.cpu(), mn_ref.cpu(), atol=2e-5, rtol=1e-5)
        assert int(counters.abs().sum()) == 0
    with pytest.raises(ValueError, match="counters"):
        step_min_logprob_triton(logits, tokens, cu, max_step_len=5, counters=counters[:2])
