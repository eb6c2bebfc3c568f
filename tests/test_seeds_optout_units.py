"""Draft randomness per request and the per-request opt-out, without an engine.

The proposer's pieces are run on a bare instance (no vLLM config): keyed draws,
ragged candidate rows, the copy-on-write block table, the selection of one row per
request; then the opt-out's validation and its step bookkeeping.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specguard_vllm.config import (
    ConfigError,
    SpecGuardParams,
    apply_request_overrides,
    request_opts_out,
)
from specguard_vllm.core.steps import StepSegmenter
from specguard_vllm.plugin.keyed_sampling import keyed_uniforms, row_stream, row_streams
from specguard_vllm.plugin.proposer import SpecGuardDraftProposer
from specguard_vllm.plugin.request_params import resolve_opt_out
from specguard_vllm.plugin.step_state import (
    NO_STEP,
    DraftRows,
    RowVerdict,
    StepMode,
    StepStateTable,
    Verdict,
)

VOCAB = ["a", "b", "\n", "</s>"]


def segmenter() -> StepSegmenter:
    return StepSegmenter(lambda ids: "".join(VOCAB[i] for i in ids), 4, ["\n"], [3])


def proposer(requests=None, *, k=4, temperature=0.7, config_seed=0, engine_seed=0,
             block_size=4, scratch_base=100, scratch_per_row=2, layers=(), tail_min_prob=0.0):
    """A SpecGuardDraftProposer with only what the candidate code reads."""
    p = SpecGuardDraftProposer.__new__(SpecGuardDraftProposer)
    p.specguard = SimpleNamespace(specguard=SpecGuardParams(
        num_candidates=k, draft_temperature=temperature, seed=config_seed,
        tail_min_prob=tail_min_prob))
    p.vllm_config = SimpleNamespace(model_config=SimpleNamespace(seed=engine_seed),
                                    scheduler_config=SimpleNamespace(max_num_seqs=4))
    p._tail_staging = {}
    p._owner = SimpleNamespace(requests=requests or {})
    p._request_keys = {}
    p._request_streams = {}
    p.segmenter = segmenter()
    p.num_speculative_tokens = 6
    p.block_size = block_size
    p._scratch_base = scratch_base
    p._scratch_blocks_per_row = scratch_per_row
    p._draft_layers = lambda: list(layers)
    return p


def sample(p, logits, cand, positions, past=None):
    """One draft position of ``cand``'s rows as the draft loop drafts it (``_LiveRows.draft``)
    at their ``positions``; ``past``: rows already past their step's end (greedy tails)."""
    from specguard_vllm.plugin.proposer import _LiveRows

    live = _LiveRows.start(None, cand, positions, cand.req_of_row.numpy())
    if past is not None:
        live.open.copy_(~past)
    return live.draft(logits, p._draws(live, 1), 0, p.specguard.specguard.draft_temperature,
                      all_open=past is None)


def advance(live, tokens, logprobs=None, *, all_tails=False):
    """What one drafted position does to the live rows' state, for given tokens and
    log-probs: the reference of the draft kernel's state update (``draft`` draws the tokens
    first, then makes exactly this update)."""
    from specguard_vllm.kernels.draft_sampling_ref import update_rows_ref

    lp = torch.zeros(tokens.shape[0]) if logprobs is None else logprobs
    update_rows_ref(tokens, lp, live.row_state(), live.table, all_tails=all_tails)


def request(seed=None, prompt=(1, 2, 3), extra_args=None, temperature=0.8):
    return SimpleNamespace(prompt_token_ids=list(prompt), sampling_params=SimpleNamespace(
        seed=seed, extra_args=extra_args, temperature=temperature))


# ------------------------------------------------------------------ keyed draws

def test_keyed_uniforms_are_a_function_of_key_candidate_and_position_only():
    keys = torch.tensor([5, 5, 5, 7, (1 << 62) + 3], dtype=torch.int64)
    cands = torch.tensor([0, 1, 0, 0, 2])
    positions = torch.tensor([10, 10, 11, 10, 4000])
    u = keyed_uniforms(keys, cands, positions)
    assert u.dtype == torch.float32 and bool(((u > 0) & (u < 1)).all())
    assert len(set(u.tolist())) == 5  # a different candidate, position or key: another draw
    for i in range(5):  # the same row alone: the same draw
        assert keyed_uniforms(keys[i:i + 1], cands[i:i + 1], positions[i:i + 1]).item() == u[i].item()
    many = keyed_uniforms(torch.arange(20000, dtype=torch.int64) * 7919, torch.zeros(20000, dtype=torch.int64),
                          torch.full((20000,), 3, dtype=torch.int64))
    counts = torch.histc(many, bins=10, min=0, max=1)
    assert counts.min() > 1800 and counts.max() < 2200  # 2000 expected per decile


@settings(max_examples=200, deadline=None)
@given(st.integers(-(1 << 63), (1 << 63) - 1), st.integers(0, 64))
def test_a_row_stream_hashed_on_the_host_is_the_device_hash(key, candidate):
    device = row_streams(torch.tensor([key]), torch.tensor([candidate]))
    assert row_stream(key, candidate) == device.item()


def test_request_keys_seeded_by_seed_and_prompt_unseeded_by_request_id_and_engine_seed():
    requests = {"a-1": request(seed=3), "b-2": request(seed=3), "c-3": request(seed=4),
                "d-4": request(seed=0), "e-5": request(), "f-6": request(), "0_g-7": request(),
                "1_g-7": request(), "h-8": request(seed=3, prompt=(9,))}
    p = proposer(requests)
    key = p._request_key
    assert key("a-1") == key("b-2")  # seeded: reproducible, whatever the request id
    assert len({key("a-1"), key("c-3"), key("d-4"), key("e-5"), key("h-8")}) == 5  # seed 0 is a seed
    assert key("e-5") != key("f-6")  # unseeded repeats of a prompt: independent
    assert key("0_g-7") != key("1_g-7")  # unseeded n > 1 siblings: independent
    # Another engine seed moves unseeded draws only; the config seed moves both.
    other_engine, other_config = proposer(requests, engine_seed=1), proposer(requests, config_seed=1)
    assert other_engine._request_key("a-1") == key("a-1")
    assert other_engine._request_key("e-5") != key("e-5")
    assert other_config._request_key("a-1") != key("a-1")
    # The same on every process: nothing per-process enters the key.
    assert proposer(requests)._request_key("e-5") == key("e-5")
    assert len(p.request_streams("a-1", 4)) == 4
    p.forget(["a-1"])
    assert "a-1" not in p._request_keys and "a-1" not in p._request_streams


def test_unseeded_greedy_requests_are_keyed_by_prompt_so_they_are_reproducible():
    requests = {"a-1": request(temperature=0.0), "b-2": request(temperature=0.0),
                "c-3": request(temperature=0.0, prompt=(4,)), "d-4": request(temperature=0.5),
                "e-5": request(temperature=0.0, seed=3), "f-6": request(seed=3)}
    p = proposer(requests)
    key = p._request_key
    assert key("a-1") == key("b-2")  # repeats of a greedy prompt: the same text every time
    assert len({key("a-1"), key("c-3"), key("d-4")}) == 3
    assert key("e-5") == key("f-6")  # a seed wins, whatever the temperature
    assert proposer(requests, engine_seed=5)._request_key("a-1") == key("a-1")
    assert proposer(requests, config_seed=5)._request_key("a-1") != key("a-1")


def test_candidate_rows_are_ragged_with_one_greedy_row_for_an_opted_out_request():
    p = proposer({"r0": request(), "r1": request(), "r2": request(), "r3": request()})
    batch = DraftRows.of(opted_out=[False, True, False, False],
                         needs_no_draft=[False, False, True, False])
    cand = p._candidate_rows(batch, ["r0", "r1", "r2", "r3"], 4, torch.device("cpu"))
    assert cand.counts == [4, 1, 1, 4] and cand.starts == [0, 4, 5, 6] and cand.rows == 10
    assert cand.req_of_row.tolist() == [0, 0, 0, 0, 1, 2, 3, 3, 3, 3]
    assert cand.cand_of_row.tolist() == [0, 1, 2, 3, 0, 0, 0, 1, 2, 3]
    assert cand.greedy.tolist() == [False] * 4 + [True] + [False] * 5
    keys = torch.tensor([p._request_key(r) for r in ("r0", "r1", "r2", "r3")])
    assert cand.streams.tolist() == row_streams(keys[cand.req_of_row], cand.cand_of_row).tolist()
    uniform = p._candidate_rows(DraftRows.uniform(2), ["r0", "r1"], 3, torch.device("cpu"))
    assert uniform.greedy is None and uniform.cand_of_row.tolist() == [0, 1, 2, 0, 1, 2]


def test_sampling_draws_each_row_from_its_own_key_whatever_the_batch():
    p = proposer({f"r{i}": request() for i in range(3)}, temperature=0.7)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=gen) * 2
    batch = DraftRows.of(opted_out=[False, True, False])
    cand = p._candidate_rows(batch, ["r0", "r1", "r2"], 4, torch.device("cpu"))
    positions = torch.tensor([7, 9, 12], dtype=torch.int64)[cand.req_of_row]
    tokens, logprobs = sample(p, logits[cand.req_of_row], cand, positions)
    assert tokens[4].item() == logits[1].argmax().item()  # the opted-out row: greedy
    assert torch.allclose(logprobs, torch.log_softmax(logits[cand.req_of_row], -1)
                          .gather(1, tokens.unsqueeze(1)).squeeze(1))
    alone = p._candidate_rows(DraftRows.uniform(1), ["r2"], 4, torch.device("cpu"))
    tokens_alone, _ = sample(p, logits[2:].repeat(4, 1), alone, torch.full((4,), 12))
    assert tokens_alone.tolist() == tokens[5:].tolist()


def test_rows_past_their_step_end_draft_greedily_and_the_rest_keep_their_draws():
    """A tail (past the step's end) is the draft's argmax; a row still in its step keeps the
    keyed draw it would have had anyway."""
    p = proposer({"r0": request(), "r1": request()}, temperature=0.7)
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(3)) * 2
    cand = p._candidate_rows(DraftRows.uniform(2), ["r0", "r1"], 4, torch.device("cpu"))
    positions = torch.full((8,), 5, dtype=torch.int64)
    sampled, _ = sample(p, logits, cand, positions)
    past = torch.tensor([True, False, False, True, False, True, False, False])
    tokens, logprobs = sample(p, logits, cand, positions, past=past)
    argmax = logits.argmax(dim=-1)
    assert torch.equal(tokens, torch.where(past, argmax, sampled))
    assert sampled.ne(argmax).any()  # at T = 0.7 some draws are not the argmax
    assert torch.allclose(logprobs, torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0])


def test_sampled_tokens_follow_the_tempered_draft_distribution():
    n = 4000
    requests = {f"r{i}": request() for i in range(n)}
    p = proposer(requests, k=1, temperature=0.5)
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0, -30.0]])
    cand = p._candidate_rows(DraftRows.uniform(n), list(requests), 1, torch.device("cpu"))
    tokens, _ = sample(p, logits.expand(n, -1), cand, torch.zeros(n, dtype=torch.int64))
    freq = torch.bincount(tokens, minlength=5).float() / n
    expected = torch.softmax(logits[0] / 0.5, -1)
    assert torch.allclose(freq, expected, atol=0.03), (freq, expected)
    assert freq[4] == 0


# ------------------------------------------------------------------ ragged expansion

def reference_block_table(block_table, positions, counts, block_size, base, per_row):
    """The expansion written out row by row (what the tensor code must equal)."""
    rows, extra = [], 0
    for i, count in enumerate(counts):
        rows.append(block_table[i].tolist())
        for _ in range(1, count):
            row = block_table[i].tolist()
            col = int(positions[i]) // block_size
            for t in range(per_row):
                if col + t < len(row):
                    row[col + t] = base + extra * per_row + t
            rows.append(row)
            extra += 1
    return rows


@pytest.mark.parametrize("counts", [[4, 4, 4], [4, 1, 4], [1, 1, 1], [1, 4, 1]])
def test_ragged_block_table_gives_private_copy_on_write_blocks_to_candidates_above_zero(counts):
    block_size, base, per_row = 4, 20, 2
    kv = torch.arange(40 * 3, dtype=torch.float32).reshape(40, 3)  # [blocks, ...] of one layer
    layer = SimpleNamespace(kv_cache=kv.clone())
    p = proposer(block_size=block_size, scratch_base=base, scratch_per_row=per_row,
                 layers=[("draft_model.layers.0", layer)])
    block_table = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=torch.int32)
    positions = torch.tensor([5, 11, 0], dtype=torch.int64)  # tail columns 1, 2 (the last), 0
    batch = DraftRows.of(opted_out=[count == 1 for count in counts])
    cand = p._candidate_rows(batch, ["a", "b", "c"], 4, torch.device("cpu"))
    expanded = p._expanded_block_table(block_table, positions, cand)
    assert expanded.dtype == block_table.dtype and expanded.is_contiguous()
    assert expanded.tolist() == reference_block_table(block_table, positions, counts, block_size,
                                                      base, per_row)
    extra = 0
    for i, count in enumerate(counts):  # each candidate's first scratch block copies the tail
        tail = int(block_table[i, int(positions[i]) // block_size])
        for _ in range(1, count):
            assert torch.equal(layer.kv_cache[base + extra * per_row], kv[tail])
            extra += 1
    untouched = [b for b in range(40) if not base <= b < base + extra * per_row]
    assert torch.equal(layer.kv_cache[untouched], kv[untouched])


def test_select_keeps_a_single_row_and_picks_among_k():
    p = proposer(k=3)
    batch = DraftRows.of(opted_out=[True, False])
    cand = p._candidate_rows(batch, ["a", "b"], 3, torch.device("cpu"))
    # Request b: candidates "a a \n", "b \n", "a a \n": the two agreeing ones are central.
    tokens = torch.tensor([[1, 1, 1], [0, 0, 2], [1, 2, 0], [0, 0, 2]])
    ends = p.segmenter.step_lengths(tokens, cand.open_states)
    assert ends.tolist() == [0, 3, 2, 3]
    out = p._select(tokens, torch.zeros(4, 3), ends, cand)
    assert out.shape == (2, 6)
    assert out[0, :3].tolist() == [1, 1, 1] and out[1, :3].tolist() == [0, 0, 2]
    assert out[:, 3:].eq(0).all()
    assert p.chosen_step_ends.tolist() == [0, 3]


def test_select_compares_candidates_on_their_step_part_only():
    """Tokens past a candidate's step end (drafted because another row had not ended) do
    not count: "a \n" + noise agrees with "a \n" + other noise."""
    p = proposer(k=3)
    batch = DraftRows.uniform(1)
    cand = p._candidate_rows(batch, ["a"], 3, torch.device("cpu"))
    tokens = torch.tensor([[0, 2, 1, 1], [1, 1, 1, 2], [0, 2, 0, 0]])
    ends = p.segmenter.step_lengths(tokens, cand.open_states)
    # Without the cut, row 0 "a \n b b" would be as central as row 2; with it, rows 0 and 2
    # are identical steps and the lower index wins.
    out = p._select(tokens, torch.tensor([[-1.0] * 4, [0.0] * 4, [-1.0, -1.0, -9.0, -9.0]]), ends, cand)
    assert out[0, :4].tolist() == [0, 2, 1, 1] and p.chosen_step_ends.tolist() == [2]
    out = p._select(tokens, torch.tensor([[-1.0] * 4, [0.0] * 4, [-1.0, -0.5, -9.0, -9.0]]), ends, cand)
    assert out[0, :4].tolist() == [0, 2, 0, 0]  # equal steps: the higher step log-likelihood


def test_drafted_columns_are_written_per_row_set_where_they_belong():
    """Columns are kept until a flush, then written for the rows that drafted them (all of
    the call's rows, then the narrowed ones); tail columns leave their log-probs at 0."""
    from specguard_vllm.plugin.proposer import _LiveRows

    p = proposer(k=2)
    cand = p._candidate_rows(DraftRows.uniform(2), ["a", "b"], 2, torch.device("cpu"))
    live = _LiveRows.start(p.segmenter, cand, torch.zeros(4, dtype=torch.int64),
                           np.array([0, 0, 1, 1]))
    tokens, logprobs = torch.zeros(4, 4, dtype=torch.int64), torch.zeros(4, 4)
    live.write(0, torch.tensor([1, 2, 3, 0]), torch.tensor([-1.0, -2.0, -3.0, -4.0]))
    live.write(1, torch.tensor([2, 2, 2, 2]), torch.tensor([-0.5] * 4))
    assert tokens.abs().sum() == 0  # nothing written before the flush
    live.flush(tokens, logprobs)
    narrow = live.narrowed(torch.tensor([1, 3]), np.array([0, 1]))
    narrow.write(2, torch.tensor([3, 1]), None)
    narrow.write(3, torch.tensor([0, 3]), None)
    narrow.flush(tokens, logprobs)
    assert tokens.tolist() == [[1, 2, 0, 0], [2, 2, 3, 0], [3, 2, 0, 0], [0, 2, 1, 3]]
    assert logprobs.tolist() == [[-1.0, -0.5, 0, 0], [-2.0, -0.5, 0, 0], [-3.0, -0.5, 0, 0],
                                 [-4.0, -0.5, 0, 0]]
    narrow.write(2, torch.tensor([1, 1]), None)
    with pytest.raises(AssertionError, match="flush"):
        narrow.narrowed(torch.tensor([0]), np.array([0]))


def test_a_request_is_done_once_every_candidate_that_waits_has_ended_its_step():
    """The device flags (the CUDA poll) and the host poll (elsewhere) agree, and the step
    ends counted on the absorbing automaton are where each row's delimiter was drafted."""
    from specguard_vllm.plugin.proposer import StepEndPoll, _LiveRows

    p = proposer(k=2)
    cand = p._candidate_rows(DraftRows.uniform(2), ["a", "b"], 2, torch.device("cpu"))
    live = _LiveRows.start(p.segmenter, cand, torch.zeros(4, dtype=torch.int64),
                           np.array([0, 0, 1, 1]))
    poll = StepEndPoll(torch.device("cpu"), 2)
    assert poll.post(live).tolist() == [False, False] and poll.all_open
    assert live.greedy is None and live.ends.tolist() == [0, 0, 0, 0]
    advance(live, torch.tensor([2, 0, 2, 2]))
    assert live.requests_done(2).tolist() == [False, True]
    assert poll.post(live).tolist() == [False, True] and not poll.all_open
    assert (~live.open).tolist() == [True, False, True, True]  # drafted greedily now
    advance(live, torch.tensor([0, 2, 0, 0]))  # END is absorbing: ended rows keep their end
    assert live.requests_done(2).tolist() == [True, True] and live.ends.tolist() == [1, 2, 1, 1]
    assert poll.post(live).tolist() == [True, True]
    # Narrowed to rows 1 and 2: the dropped rows' step ends are kept.
    narrow = live.narrowed(torch.tensor([1, 2]), np.array([0, 1]))
    assert narrow.row_ids().tolist() == [1, 2] and narrow.full_ends().tolist() == [1, 2, 1, 1]
    advance(narrow, torch.tensor([0, 0]))
    assert narrow.requests_done(2).tolist() == [True, True]
    assert narrow.full_ends().tolist() == [1, 2, 1, 1]
    idle = p._candidate_rows(DraftRows.of(needs_no_draft=[True]), ["a"], 2, torch.device("cpu"))
    live = _LiveRows.start(p.segmenter, idle, torch.zeros(1, dtype=torch.int64), np.array([0]))
    assert live.requests_done(1).tolist() == [True]  # no row waits: done before any token
    assert StepEndPoll(torch.device("cpu"), 1).post(live).tolist() == [True]
    opened = DraftRows.of(open_states=[p.segmenter.state_after([0])])
    assert p._candidate_rows(opened, ["a"], 2, torch.device("cpu")).open_states.tolist() == [0, 0]


# ------------------------------------------------------------------ tails stopped early
def kept_by_rule(step_end: int | None, logprobs: list[float], threshold: float) -> int:
    """The rule, written out: every step token is kept; the tail past ``step_end`` up to
    and including its first token of probability below ``threshold``."""
    if step_end is None or threshold == 0.0:
        return len(logprobs)
    for i in range(step_end, len(logprobs)):
        if logprobs[i] < np.log(threshold):
            return i + 1
    return len(logprobs)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_a_tail_stops_after_its_first_unsure_token_and_narrowing_keeps_the_counts(data):
    """A drafted position's state update gives the rule above for every row (step
    tokens never stop a row, an opted-out row is never stopped), also across a narrowing
    and when the last positions are known on the host to be all tails."""
    from specguard_vllm.plugin.proposer import TailPoll, _LiveRows

    threshold = data.draw(st.sampled_from([0.3, 0.5, 0.7, 1.0]))
    width = data.draw(st.integers(2, 7))
    p = proposer(k=2, tail_min_prob=threshold)
    batch = DraftRows.of(opted_out=[False, True, False])
    cand = p._candidate_rows(batch, ["a", "b", "c"], 2, torch.device("cpu"))
    assert cand.tail_stop_below.tolist()[2] == -np.inf  # the opted-out row
    rows = cand.rows
    step_ends = [data.draw(st.one_of(st.none(), st.integers(1, width))) for _ in range(rows)]
    logprobs = [[data.draw(st.sampled_from([-0.05, -0.4, -0.9, -2.0])) for _ in range(width)]
                for _ in range(rows)]
    # Token 2 ("\n") ends a step: each row drafts it at its step end, "a" elsewhere.
    tokens = [[2 if end == pos + 1 else 0 for pos in range(width)] for end in step_ends]
    narrow_at = data.draw(st.integers(1, width))
    live = _LiveRows.start(p.segmenter, cand, torch.zeros(rows, dtype=torch.int64),
                           cand.req_of_row.numpy())
    keep = torch.tensor([0, 2, 3, 4])  # drops row 1 (its count frozen at narrow_at)
    for pos in range(width):
        if pos == narrow_at:
            live = live.narrowed(keep, cand.req_of_row.numpy()[keep.numpy()])
        ids = live.row_ids().tolist()
        column = torch.tensor([logprobs[r][pos] for r in ids], dtype=torch.float32)
        tails_only = all(step_ends[r] is not None and step_ends[r] <= pos for r in ids)
        advance(live, torch.tensor([tokens[r][pos] for r in ids]), column,
                all_tails=tails_only and data.draw(st.booleans()))
    expected = [kept_by_rule(None if r == 2 else step_ends[r], logprobs[r], threshold)
                for r in range(rows)]  # row 2 is the opted-out request's
    expected[1] = kept_by_rule(step_ends[1], logprobs[1][:narrow_at], threshold)
    assert live.full_kept().tolist() == expected
    # A row still goes on if not even a most unsure next token would have been its last.
    going = TailPoll(torch.device("cpu")).any_going(live)
    assert going == any(kept_by_rule(None if r == 2 else step_ends[r], logprobs[r] + [-9.0],
                                     threshold) > width for r in live.row_ids().tolist())


def test_without_tail_min_prob_nothing_is_tracked():
    p = proposer(k=2)
    cand = p._candidate_rows(DraftRows.uniform(1), ["a"], 2, torch.device("cpu"))
    assert cand.tail_stop_below is None


# ------------------------------------------------------------------ the opt-out

@pytest.mark.parametrize("value, off", [(False, True), (True, False), (0, True), (1, False)])
def test_opt_out_accepts_booleans_and_the_0_1_vllm_server_turns_them_into(value, off):
    assert request_opts_out({"specguard": value, "tau": 0.3}) is off
    assert resolve_opt_out(request(extra_args={"specguard": value})) is off


@pytest.mark.parametrize("value", ["false", "off", 2, 0.0, None, [False]])
def test_bad_opt_out_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"specguard: must be true or false"):
        request_opts_out({"specguard": value})
    with pytest.raises(ConfigError, match=r"specguard: must be true or false"):
        apply_request_overrides(SpecGuardParams(), {"specguard": value})


def test_no_opt_out_by_default():
    assert request_opts_out({}) is False and request_opts_out({"specguard_tau": 0.2}) is False
    assert resolve_opt_out(request()) is False and resolve_opt_out(None) is False


def test_opted_out_request_stays_token_level_and_drafts_whole_rows():
    steps = StepStateTable(segmenter())
    steps.after_sampling("r", [0], NO_STEP)  # prefill, before its knobs are resolved
    steps.opt_out("r")
    for row in ([1, 2, 0, 1], [2, 2], [0, 3]):
        draft = steps.truncate_draft("r", row + [1, 1], keep_tail=True)
        assert draft.step_len == 0  # nothing in the row is judged as a step
        cut = row if 3 not in row else row[: row.index(3) + 1]
        assert draft.tokens == (cut + [1, 1] if 3 not in row else cut)
        steps.after_sampling("r", row, RowVerdict(Verdict.TOKEN_LEVEL))
        state = steps.get("r")
        assert state.mode is StepMode.TOKEN_LEVEL and state.opted_out and state.open_len == 0
