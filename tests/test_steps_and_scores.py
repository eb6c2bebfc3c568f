"""Step segmentation, LPBV and the ensemble decision."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specguard_vllm.core.confidence import lpbv_normalised, segment_min, token_logprobs
from specguard_vllm.core.decision import decide_steps, ensemble_score
from specguard_vllm.core.steps import StepSegmenter

VOCAB = ["a", "b", "\n", "x\ny", " ", "\n\n", "</s>"]


def segmenter(delims, eos=(6,)):
    return StepSegmenter(lambda ids: "".join(VOCAB[i] for i in ids), len(VOCAB), delims, eos)


def test_step_ends_at_first_token_containing_the_delimiter():
    seg = segmenter(["\n"])
    assert seg.step_length([0, 1, 2, 0]) == 3
    assert seg.step_length([0, 3, 0]) == 2  # delimiter inside a token
    assert seg.step_length([0, 1]) is None
    assert seg.step_length([0, 6]) == 2  # EOS ends a step
    assert seg.step_lengths(torch.tensor([[0, 1, 2, 0], [0, 0, 0, 0], [3, 0, 0, 0]])).tolist() == [3, 4, 1]


def test_multi_token_delimiter_is_found_across_tokens():
    seg = segmenter(["\n\n"])
    assert seg.step_length([0, 2, 0]) is None
    assert seg.step_length([0, 2, 2, 0]) == 3  # "\n" + "\n"
    assert seg.step_length([0, 5]) == 2
    assert seg.step_length([2, 0], prefix=[2]) == 1  # started in the open step's prefix
    assert seg.step_lengths(torch.tensor([[0, 2, 2, 0], [1, 1, 1, 1]])).tolist() == [3, 4]


def test_segmenter_refuses_empty_delimiters():
    with pytest.raises(ValueError):
        segmenter([])
    with pytest.raises(ValueError):
        segmenter([""])


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=10), min_size=1, max_size=6))
def test_batched_step_lengths_equal_scalar_scan(rows):
    seg = segmenter(["\n"])
    width = max(len(r) for r in rows)
    padded = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    expected = [seg.step_length(r) or width for r in padded.tolist()]
    assert seg.step_lengths(padded).tolist() == expected


@settings(max_examples=100, deadline=None)
@given(t=st.integers(1, 6), v=st.integers(2, 9), seed=st.integers(0, 10**6))
def test_token_logprobs_equal_log_softmax_gather(t, v, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, v, generator=gen) * 5
    tokens = torch.randint(0, v, (t,), generator=gen)
    want = torch.log_softmax(logits, -1)[torch.arange(t), tokens]
    torch.testing.assert_close(token_logprobs(logits, tokens), want)


def test_segment_min_over_ragged_steps():
    values = torch.tensor([-1.0, -3.0, -0.5, -2.0, -0.1, -4.0])
    cu = torch.tensor([0, 2, 3, 6])
    assert segment_min(values, cu).tolist() == [-3.0, -0.5, -4.0]
    with pytest.raises(ValueError):
        segment_min(values, torch.tensor([0, 0, 6]))


def test_lpbv_normalisation_maps_zero_to_one_and_floor_to_zero():
    got = lpbv_normalised(torch.tensor([0.0, -2.5, -5.0, -9.0]), -5.0)
    torch.testing.assert_close(got, torch.tensor([1.0, 0.5, 0.0, 0.0]))
    with pytest.raises(ValueError):
        lpbv_normalised(torch.tensor([0.0]), 0.0)


@settings(max_examples=200, deadline=None)
@given(l_min=st.floats(-50, 0), g=st.floats(0, 1), beta=st.floats(0, 1), tau=st.floats(0, 2))
def test_decision_is_score_at_least_tau(l_min, g, beta, tau):
    score, accepted = decide_steps(torch.tensor([l_min]), torch.tensor([g]), tau=tau, beta=beta,
                                   lpbv_floor=-5.0)
    expected = beta * min(max(1 - l_min / -5.0, 0), 1) + (1 - beta) * g
    assert score.item() == pytest.approx(expected, abs=1e-6)
    assert 0.0 <= score.item() <= 1.0 + 1e-6
    tau32 = torch.tensor(tau, dtype=torch.float32).item()  # the rule runs in float32
    assert bool(accepted.item()) == (score.item() >= tau32)
    if tau == 0:
        assert accepted.item()
    if tau > 1 + 1e-6:
        assert not accepted.item()


def test_per_request_tau_and_beta():
    score, accepted = decide_steps(torch.tensor([-1.0, -1.0]), torch.tensor([0.2, 0.2]),
                                   tau=torch.tensor([0.0, 0.9]), beta=torch.tensor([1.0, 0.0]),
                                   lpbv_floor=-5.0)
    torch.testing.assert_close(score, torch.tensor([0.8, 0.2]))
    assert accepted.tolist() == [True, False]
    assert math.isclose(float(ensemble_score(torch.tensor(0.0), torch.tensor(0.0), 0.5, -5.0)), 0.5)
