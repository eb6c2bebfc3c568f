"""Step segmentation, LPBV and the ensemble decision."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specguard_vllm.core.confidence import lpbv_normalised, min_logprob_per_step, token_logprobs
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
    assert [seg.step_length(r) for r in [[0, 1, 2, 0], [0, 0, 0, 0], [3, 0, 0, 0]]] == [3, None, 1]


def test_multi_token_delimiter_is_found_across_tokens():
    seg = segmenter(["\n\n"])
    assert seg.step_length([0, 2, 0]) is None
    assert seg.step_length([0, 2, 2, 0]) == 3  # "\n" + "\n"
    assert seg.step_length([0, 5]) == 2
    assert seg.step_length([2, 0], prefix=[2]) == 1  # started in the open step's prefix
    assert [seg.step_length(r) for r in [[0, 2, 2, 0], [1, 1, 1, 1]]] == [3, None]


def test_segmenter_refuses_empty_delimiters():
    with pytest.raises(ValueError):
        segmenter([])
    with pytest.raises(ValueError):
        segmenter([""])


def first_step_end(row, delims, eos=6):
    """The slow obvious scan: the first prefix whose decoded text holds a delimiter, or EOS."""
    for t in range(len(row)):
        text = "".join(VOCAB[i] for i in row[: t + 1])
        if row[t] == eos or any(d in text for d in delims):
            return t + 1
    return None


@settings(max_examples=100, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=10), min_size=1, max_size=6),
    delims=st.sampled_from([["\n"], ["\n\n"], ["\n\n", "y"]]),
)
def test_step_length_equals_the_decoded_text_scan(rows, delims):
    seg = segmenter(delims)
    expected = [first_step_end(r, delims) for r in rows]
    assert [seg.step_length(r) for r in rows] == expected


@settings(max_examples=100, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(0, 6), min_size=4, max_size=4), min_size=1, max_size=6),
    prefixes=st.lists(st.lists(st.integers(0, 5), max_size=3), min_size=6, max_size=6),
    delims=st.sampled_from([["\n"], ["\n\n"], ["\n\n", "y"], ["ab\n", "b\n\n"]]),
)
def test_batched_step_lengths_equal_the_host_scan(rows, prefixes, delims):
    """The device path (one gather per position over all rows) finds the same step ends as
    the host scan, from each row's open-step state."""
    seg = segmenter(delims)
    states = torch.tensor([seg.state_after(prefixes[i]) for i in range(len(rows))])
    got = seg.step_lengths(torch.tensor(rows), states).tolist()
    want = [seg.step_length(r, prefix=prefixes[i]) or 0 for i, r in enumerate(rows)]
    assert got == want
    limits = torch.tensor([i % 5 for i in range(len(rows))])
    got = seg.step_lengths(torch.tensor(rows), states, limits).tolist()
    assert got == [w if w <= i % 5 else 0 for i, w in enumerate(want)]


@settings(max_examples=100, deadline=None)
@given(
    prefixes=st.lists(st.lists(st.integers(0, 6), max_size=4), min_size=1, max_size=8),
    tokens=st.lists(st.integers(0, 6), min_size=9, max_size=9),
    delims=st.sampled_from([["\n"], ["\n\n"], ["\n\n", "y"], ["ab\n", "b\n\n"]]),
)
def test_drafted_advance_equals_the_checked_advance_for_in_vocab_tokens(prefixes, tokens, delims):
    """The draft loop's flat gather and the range-checked advance agree on every state,
    the ended one included."""
    seg = segmenter(delims)
    states = torch.tensor([seg.state_after(p) for p in prefixes] + [seg.END], dtype=torch.int64)
    drafted = torch.tensor(tokens[: states.shape[0]], dtype=torch.int64)  # one per state
    assert seg.advance_drafted(states, drafted).tolist() == seg.advance_rows(states, drafted).tolist()


def test_bundled_tokenizer_step_ends_match_decoding_the_whole_text():
    """On the bundled tokenizer, the automaton's step end is the first prefix whose decoded
    text holds a delimiter (or EOS), for one- and multi-token delimiters."""
    import random
    from pathlib import Path

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(__file__).resolve().parents[1] / "models/tiny-target")
    rng = random.Random(0)
    newline = tok.convert_tokens_to_ids(tok.tokenize("\n"))
    pool = list(range(len(tok))) + newline * 40  # newlines often enough to meet "\n\n"
    for delims in (["\n"], ["\n\n"], ["\n\n", "= "]):
        seg = StepSegmenter.from_tokenizer(tok, delims)
        for _ in range(300):
            row = [rng.choice(pool) for _ in range(rng.randint(1, 12))]
            want = None
            for t in range(len(row)):
                text = tok.decode(row[: t + 1], skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False)
                if row[t] == tok.eos_token_id or any(d in text for d in delims):
                    want = t + 1
                    break
            assert seg.step_length(row) == want, (delims, row)


@settings(max_examples=100, deadline=None)
@given(t=st.integers(1, 6), v=st.integers(2, 9), seed=st.integers(0, 10**6))
def test_token_logprobs_equal_log_softmax_gather(t, v, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, v, generator=gen) * 5
    tokens = torch.randint(0, v, (t,), generator=gen)
    want = torch.log_softmax(logits, -1)[torch.arange(t), tokens]
    torch.testing.assert_close(token_logprobs(logits, tokens), want)


def test_min_logprob_per_step_over_ragged_steps():
    values = torch.tensor([-1.0, -3.0, -0.5, -2.0, -0.1, -4.0])
    cu = torch.tensor([0, 2, 3, 6])
    assert min_logprob_per_step(values, cu).tolist() == [-3.0, -0.5, -4.0]
    # An empty step has no token to doubt: 0.0, finite.
    assert min_logprob_per_step(values, torch.tensor([0, 0, 6])).tolist() == [0.0, -4.0]
    with pytest.raises(ValueError):
        min_logprob_per_step(values, torch.tensor([0, 3, 2]))


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(0, 5), min_size=1, max_size=6), seed=st.integers(0, 10**6))
def test_min_logprob_per_step_equals_python_min_of_each_slice(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    values = -torch.rand(sum(lengths), generator=gen) * 10
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    want = [min(values[a:b].tolist(), default=0.0) for a, b in itertools.pairwise(cu)]
    assert min_logprob_per_step(values, cu).tolist() == want


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


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 5), max_size=6), start=st.integers(0, 4),
       extra=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_min_logprob_per_step_matches_the_slices_whatever_the_offset_and_padding(
        lengths, start, extra, seed):
    """Token i of ``logprobs`` is token cu[0] + i; values past the last step are ignored; no
    step gives an empty result (the search-based owner needs no host read of the lengths)."""
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([start] + [start + sum(lengths[: i + 1]) for i in range(len(lengths))])
    values = -torch.rand(sum(lengths) + extra, generator=gen) * 5
    want = [float(values[int(cu[i]) - start: int(cu[i + 1]) - start].min())
            if lengths[i] else 0.0 for i in range(len(lengths))]
    assert min_logprob_per_step(values, cu).tolist() == want
