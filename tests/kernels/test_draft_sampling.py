"""The fused draft-sampling kernel against its reference."""

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from specguard_vllm.kernels.draft_sampling import draft_greedy_triton, draft_sample_triton
from specguard_vllm.kernels.draft_sampling_ref import draft_greedy_ref, draft_sample_ref


def tempered_intervals(logits: torch.Tensor, tokens: torch.Tensor, temperature: float):
    """Each token's CDF interval ``(lower, upper]`` and weight, in float64."""
    w = torch.softmax(logits.double() / temperature, dim=-1)
    cdf = w.cumsum(dim=-1)
    weight = w.gather(1, tokens[:, None]).squeeze(1)
    upper = cdf.gather(1, tokens[:, None]).squeeze(1)
    return upper - weight, upper, weight, cdf[:, -1]


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    rows=st.integers(1, 6),
    vocab=st.sampled_from([1, 7, 100, 1000, 5003]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    temperature=st.sampled_from([0.3, 0.7, 1.0, 1.7]),
    block_v=st.sampled_from([16, 256, None]),
    banned=st.sampled_from([0.0, 0.5, 0.9]),
    with_greedy=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_draws_within_the_tempered_cdf_and_matches_the_reference(
        device, rows, vocab, dtype, temperature, block_v, banned, with_greedy, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * 4)
    mask = torch.rand(rows, vocab, generator=gen) < banned
    mask[torch.arange(rows), torch.randint(0, vocab, (rows,), generator=gen)] = False
    logits = logits.masked_fill(mask, float("-inf")).to(dtype)
    u = torch.rand(rows, generator=gen).clamp(min=1e-6)
    u[0] = 1.0  # the largest keyed uniform rounds to 1.0 in float32
    greedy = (torch.rand(rows, generator=gen) < 0.4) if with_greedy else None
    tokens, logprobs = draft_sample_triton(logits.to(device), u.to(device),
                                           None if greedy is None else greedy.to(device),
                                           temperature=temperature, block_v=block_v)
    tokens, logprobs = tokens.cpu(), logprobs.cpu()
    ref_tokens, ref_logprobs = draft_sample_ref(logits, u, greedy, temperature=temperature)
    assert tokens.dtype == torch.int64 and tokens.lt(vocab).all() and tokens.ge(0).all()
    x = logits.float()
    lower, upper, weight, total = tempered_intervals(x, tokens, temperature)
    assert weight.gt(0).all()  # never an id of probability 0
    sampled = torch.ones(rows, dtype=torch.bool) if greedy is None else ~greedy
    target = u.double() * total
    slack = 1e-5
    inside = (lower - slack <= target) & (target <= upper + slack)
    assert inside[sampled].all()
    if greedy is not None:  # greedy rows: exactly the first argmax
        assert torch.equal(tokens[greedy], x.argmax(dim=-1)[greedy])
    # Away from a CDF boundary (float rounding), the very token the reference draws.
    r_lower, r_upper, _, _ = tempered_intervals(x, ref_tokens, temperature)
    clear = (target - r_lower > slack) & (r_upper - target > slack)
    assert torch.equal(tokens[clear | ~sampled], ref_tokens[clear | ~sampled])
    want = torch.log_softmax(x, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs, want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ref_logprobs[clear | ~sampled], want[clear | ~sampled],
                               atol=2e-5, rtol=1e-5)


def test_draws_follow_the_tempered_distribution(device):
    """4,000 stratified uniforms through one row: frequencies match the weights."""
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(3)) * 2
    n = 4000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    tokens, _ = draft_sample_triton(logits.expand(n, -1).contiguous().to(device),
                                    u.float().to(device), None, temperature=0.7, block_v=16)
    counts = torch.bincount(tokens.cpu(), minlength=50).double() / n
    p = torch.softmax(logits[0].double() / 0.7, dim=-1)
    assert (counts - p).abs().max() <= 1.5 / n + 1e-9  # stratified: off by a draw at most


def test_launch_wrapper_rejects_bad_inputs(device):
    logits = torch.randn(3, 10, device=device)
    u = torch.rand(3, device=device)
    with pytest.raises(ValueError, match="unit stride"):
        draft_sample_triton(logits.t(), torch.rand(10, device=device), None, temperature=0.7)
    with pytest.raises(ValueError, match="temperature"):
        draft_sample_triton(logits, u, None, temperature=0.0)
    with pytest.raises(ValueError, match="one entry per row"):
        draft_sample_triton(logits, u[:2], None, temperature=0.7)
    with pytest.raises(TypeError, match="bool"):
        draft_sample_triton(logits, u, torch.zeros(3, dtype=torch.int32, device=device),
                            temperature=0.7)


def test_strided_uniforms_and_flags_are_read_per_row(device):
    """The proposer passes column ``step`` of its ``[R, K]`` draws (a strided view)."""
    gen = torch.Generator().manual_seed(9)
    logits = (torch.randn(6, 64, generator=gen) * 3).to(device)
    draws = torch.rand(6, 5, generator=gen).to(device)
    flags = (torch.rand(6, 2, generator=gen) < 0.5).to(device)
    got = draft_sample_triton(logits, draws[:, 3], flags[:, 1], temperature=0.7, block_v=16)
    want = draft_sample_triton(logits, draws[:, 3].clone(), flags[:, 1].clone(),
                               temperature=0.7, block_v=16)
    ref = draft_sample_ref(logits.cpu(), draws[:, 3].cpu(), flags[:, 1].cpu(), temperature=0.7)
    assert torch.equal(got[0], want[0]) and torch.equal(got[0].cpu(), ref[0])
    wide = draft_sample_triton(logits, draws.double()[:, 3], flags[:, 1], temperature=0.7,
                               block_v=16)  # converted to float32: a dense copy, its own stride
    assert torch.equal(wide[0], want[0])


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(rows=st.integers(1, 5), vocab=st.sampled_from([1, 9, 300, 2049]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_all_greedy_position_gives_the_greedy_rows_bits(device, rows, vocab, dtype, seed):
    """A tail's log-prob at an all-tails position (draft_greedy) is the very value a greedy
    row gets where other rows are sampled (draft_sample), in the reference and the kernel:
    the tail stop (tail_min_prob) must not depend on what else is in the batch."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype)
    mixed_greedy = torch.ones(rows, dtype=torch.bool)
    mixed_greedy[0] = rows == 1  # row 0 sampled beside the others, unless it is alone
    u = torch.rand(rows, generator=gen).clamp(min=1e-6)
    ref_mixed = draft_sample_ref(logits, u, mixed_greedy, temperature=0.7)
    ref_tokens, ref_logprobs = draft_greedy_ref(logits)
    assert torch.equal(ref_tokens, logits.float().argmax(dim=-1))
    assert torch.equal(ref_tokens[mixed_greedy], ref_mixed[0][mixed_greedy])
    assert torch.equal(ref_logprobs[mixed_greedy], ref_mixed[1][mixed_greedy])
    tokens, logprobs = draft_greedy_triton(logits.to(device))
    mixed = draft_sample_triton(logits.to(device), u.to(device), mixed_greedy.to(device),
                                temperature=0.7)
    assert torch.equal(tokens.cpu(), ref_tokens)
    assert torch.equal(tokens.cpu()[mixed_greedy], mixed[0].cpu()[mixed_greedy])
    assert torch.equal(logprobs.cpu()[mixed_greedy], mixed[1].cpu()[mixed_greedy])
    assert torch.allclose(logprobs.cpu(), ref_logprobs, atol=1e-5)


def _row_state(gen, rows: int, num_states: int, *, all_open: bool, tails: bool, automaton: bool):
    """A random, consistent drafting state: open exactly where the automaton is not at END."""
    from specguard_vllm.kernels.draft_sampling_ref import DraftRowState

    end = num_states
    states = torch.randint(0, num_states + 1, (rows,), generator=gen)
    if all_open:
        states = states.clamp(max=num_states - 1)
    open_ = states != end
    return DraftRowState(
        open=open_, open_pushes=torch.randint(0, 5, (rows,), generator=gen),
        states=states if automaton else None,
        tail_open=(torch.rand(rows, generator=gen) < 0.7) if tails else None,
        kept=torch.randint(0, 5, (rows,), generator=gen) if tails else None,
        stop_below=torch.tensor([-float("inf"), -0.5, -2.0])[
            torch.randint(0, 3, (rows,), generator=gen)] if tails else None)


def _cloned(rows, device=None):
    from specguard_vllm.kernels.draft_sampling_ref import DraftRowState

    return DraftRowState(*[None if t is None else t.clone().to(device or t.device) for t in rows])


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@example(rows=7, vocab=64, temperature=0.7, fixed_greedy=True, indexed=True, all_open=False,
         all_tails=False, tails=True, automaton=True, seed=1)  # every branch at once
@example(rows=7, vocab=64, temperature=0.7, fixed_greedy=False, indexed=False, all_open=False,
         all_tails=True, tails=True, automaton=True, seed=2)
@given(rows=st.integers(1, 7), vocab=st.sampled_from([5, 64, 300]),
       temperature=st.sampled_from([0.0, 0.7, 1.3]), fixed_greedy=st.booleans(),
       indexed=st.booleans(), all_open=st.booleans(), all_tails=st.booleans(),
       tails=st.booleans(), automaton=st.booleans(), seed=st.integers(0, 2**16))
def test_draft_position_kernel_moves_the_rows_on_as_the_reference_does(
        device, rows, vocab, temperature, fixed_greedy, indexed, all_open, all_tails, tails,
        automaton, seed):
    """One launch for a draft position against the reference's ~20 ops: the same tokens away
    from a CDF boundary, the same log-probs, and, for the tokens it drew, exactly the state
    the reference's update gives (tail kept/stopped, automaton step, open flags, step-end
    counts); greedy rows (SpecGuard off, past their step, temperature 0, all tails) take
    the first argmax."""
    from specguard_vllm.kernels.draft_sampling import draft_position_triton
    from specguard_vllm.kernels.draft_sampling_ref import (
        StepTable, draft_position_ref, update_rows_ref)

    if all_tails:
        all_open = False
    gen = torch.Generator().manual_seed(seed)
    num_states = 4
    logits = torch.randn(rows, vocab, generator=gen) * 3
    flat = torch.randint(0, num_states + 1, ((num_states + 1) * vocab,), generator=gen)
    flat[num_states * vocab:] = num_states  # END is absorbing
    table = StepTable(flat, vocab, num_states) if automaton else None
    state = _row_state(gen, rows, num_states, all_open=all_open, tails=tails,
                       automaton=automaton)
    greedy = (torch.rand(rows, generator=gen) < 0.3) if fixed_greedy else None
    source_rows = rows + 3
    uniforms = torch.rand(source_rows, 6, generator=gen).clamp(min=1e-6)
    u_rows = torch.randperm(source_rows, generator=gen)[:rows] if indexed else None
    if not indexed:
        uniforms = uniforms[:rows]
    u_col = int(torch.randint(0, 6, (1,), generator=gen))
    kwargs = dict(temperature=temperature, u_col=u_col, all_open=all_open, all_tails=all_tails)

    want_state = _cloned(state)
    want_tokens, want_lp = draft_position_ref(logits, uniforms, greedy, want_state, table,
                                              u_rows=u_rows, **kwargs)
    got_state = _cloned(state, device)
    on = (lambda t: None if t is None else t.to(device))
    got_tokens, got_lp = draft_position_triton(
        logits.to(device), on(uniforms), on(greedy), got_state,
        None if table is None else StepTable(flat.to(device), vocab, num_states),
        u_rows=on(u_rows), block_v=16, **kwargs)
    got_tokens, got_lp = got_tokens.cpu(), got_lp.cpu()
    got_state = _cloned(got_state, "cpu")

    # The state the kernel left is the reference's update for the tokens it drew.
    replayed = _cloned(state)
    update_rows_ref(got_tokens, got_lp, replayed, table, all_tails=all_tails)
    for name, got, want in zip(DraftRowState_fields(), got_state, replayed):
        assert (got is None) == (want is None), name
        if got is not None:
            assert torch.equal(got, want), name
    torch.testing.assert_close(
        got_lp, torch.log_softmax(logits, -1).gather(1, got_tokens[:, None]).squeeze(1),
        atol=2e-5, rtol=1e-5)
    greedy_rows = torch.zeros(rows, dtype=torch.bool) if greedy is None else greedy.clone()
    if not all_open:
        greedy_rows |= ~state.open
    if all_tails or temperature == 0.0:
        greedy_rows[:] = True
    assert torch.equal(got_tokens[greedy_rows], logits.argmax(-1)[greedy_rows])
    if temperature > 0.0 and not all_tails:  # sampled rows: the reference's draw off a boundary
        u = uniforms[:, u_col] if u_rows is None else uniforms[u_rows, u_col]
        lower, upper, _, total = tempered_intervals(logits, want_tokens, temperature)
        target = u.double() * total
        clear = ((target - lower > 1e-5) & (upper - target > 1e-5)) | greedy_rows
        assert torch.equal(got_tokens[clear], want_tokens[clear])
    else:
        assert torch.equal(got_tokens, want_tokens)
    if torch.equal(got_tokens, want_tokens):
        for got, want in zip(got_state, want_state):
            assert got is None or torch.equal(got, want)


def DraftRowState_fields():  # noqa: N802 - the NamedTuple's field names, for messages
    from specguard_vllm.kernels.draft_sampling_ref import DraftRowState

    return DraftRowState._fields


def test_draft_position_reference_is_the_loop_it_replaces():
    """The reference is what the proposer's loop did position by position: the column of
    keyed draws, greedy past the step, draft_sample, then the tail rule and the automaton
    step (written out here with plain tensor ops)."""
    from specguard_vllm.kernels.draft_sampling_ref import (
        StepTable, draft_position_ref, draft_sample_ref)

    gen = torch.Generator().manual_seed(5)
    rows, vocab, num_states = 6, 40, 3
    logits = torch.randn(rows, vocab, generator=gen) * 2
    flat = torch.randint(0, num_states + 1, ((num_states + 1) * vocab,), generator=gen)
    flat[num_states * vocab:] = num_states
    state = _row_state(gen, rows, num_states, all_open=False, tails=True, automaton=True)
    fixed = torch.tensor([False, True, False, False, True, False])
    uniforms = torch.rand(9, 4, generator=gen)
    u_rows = torch.tensor([8, 0, 3, 1, 5, 2])
    got_state = _cloned(state)
    tokens, lp = draft_position_ref(logits, uniforms, fixed, got_state,
                                    StepTable(flat, vocab, num_states), temperature=0.7,
                                    u_rows=u_rows, u_col=2)
    want_tokens, want_lp = draft_sample_ref(logits, uniforms[u_rows, 2], fixed | ~state.open,
                                            temperature=0.7)
    assert torch.equal(tokens, want_tokens) and torch.equal(lp, want_lp)
    kept = state.kept + state.tail_open
    tail_open = state.tail_open & ((lp >= state.stop_below) | state.open)
    states = flat[state.states * vocab + tokens]
    assert torch.equal(got_state.kept, kept) and torch.equal(got_state.tail_open, tail_open)
    assert torch.equal(got_state.states, states)
    assert torch.equal(got_state.open, states != num_states)
    assert torch.equal(got_state.open_pushes, state.open_pushes + (states != num_states))


def test_draft_position_wrapper_names_what_is_wrong(device):
    from specguard_vllm.kernels.draft_sampling import draft_position_triton
    from specguard_vllm.kernels.draft_sampling_ref import DraftRowState

    logits = torch.randn(3, 10, device=device)
    rows = DraftRowState(open=torch.ones(3, dtype=torch.bool, device=device),
                         open_pushes=torch.zeros(3, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="need uniforms"):
        draft_position_triton(logits, None, None, rows, None, temperature=0.7)
    with pytest.raises(ValueError, match="unit stride"):
        draft_position_triton(logits, torch.rand(4, 3, device=device).t(), None, rows, None,
                              temperature=0.7)
    with pytest.raises(ValueError, match="open_pushes must be"):
        draft_position_triton(logits, torch.rand(3, 4, device=device), None,
                              rows._replace(open_pushes=rows.open_pushes.int()), None,
                              temperature=0.7)
    with pytest.raises(ValueError, match="needs the rows' states"):
        from specguard_vllm.kernels.draft_sampling_ref import StepTable
        draft_position_triton(logits, torch.rand(3, 4, device=device), None, rows,
                              StepTable(torch.zeros(20, dtype=torch.int64, device=device), 10, 1),
                              temperature=0.7)
    with pytest.raises(ValueError, match="one row per logits row"):
        draft_position_triton(logits, torch.rand(5, 4, device=device), None, rows, None,
                              temperature=0.7)
