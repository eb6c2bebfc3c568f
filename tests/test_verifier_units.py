"""The verifier's output assembly in tensor ops, against the row-by-row rule it replaces."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specguard_vllm.plugin.verifier import PLACEHOLDER_TOKEN_ID, SpecGuardRejectionSampler


def row_by_row(token_rows, first_only, width):
    """Every row is vLLM's token-level result; a regenerated rejected step keeps its first."""
    out = torch.full((token_rows.shape[0], width), PLACEHOLDER_TOKEN_ID, dtype=torch.int32)
    for i in range(token_rows.shape[0]):
        if first_only[i]:
            out[i, 0] = token_rows[i, 0]
        else:
            out[i] = token_rows[i, :width]
    return out


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_assemble_equals_the_row_by_row_rule(data):
    max_spec = data.draw(st.integers(0, 6))
    rows = data.draw(st.integers(1, 6))
    width = max_spec + 1
    token_rows = torch.randint(200, 300, (rows, width), dtype=torch.int64)
    token_rows[:, 1:][torch.rand(rows, max_spec) < 0.3] = PLACEHOLDER_TOKEN_ID  # rejections
    first_only = [data.draw(st.booleans()) for _ in range(rows)]
    metadata = SimpleNamespace(max_spec_len=max_spec)
    got = SpecGuardRejectionSampler._assemble(
        metadata, token_rows, torch.tensor(first_only) if any(first_only) else None)
    assert got.dtype == torch.int32
    assert torch.equal(got, row_by_row(token_rows, first_only, width))


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_prefix_positions_are_each_rows_first_positions(data):
    """The device-side index of each row's first ``lengths[i]`` draft positions equals the
    plain per-row enumeration."""
    num_drafts = data.draw(st.lists(st.integers(0, 6), min_size=1, max_size=12))
    lengths = [data.draw(st.integers(0, n)) for n in num_drafts]
    want, offset = [], 0
    for n, m in zip(num_drafts, lengths):
        want += range(offset, offset + m)
        offset += n
    got = SpecGuardRejectionSampler._prefix_positions(
        torch.tensor(num_drafts), torch.tensor(lengths), sum(lengths))
    assert got.tolist() == want


def test_rows_to_device_is_one_tensor_of_the_rows():
    from specguard_vllm.plugin.host_transfer import rows_to_device

    got = rows_to_device([[1, 2, 3], [True, False, True], [0.5, 0.25, 1.0]], torch.float64, "cpu")
    assert got.shape == (3, 3) and got.dtype == torch.float64
    assert got.tolist() == [[1, 2, 3], [1, 0, 1], [0.5, 0.25, 1.0]]
    assert rows_to_device([[], []], torch.int64, "cpu").shape == (2, 0)


def test_row_facts_judge_whole_steps_only_and_route_the_rest_token_level():
    """One row per case (drafts, step length, proposed step, fallback speculative, finishing a
    rejected step token-level, decision) -> judged, truncated, regenerated, token-level."""
    from specguard_vllm.plugin.verifier import _RowFacts

    cases = [
        # n, step, proposed, spec, in_token, accepted -> judged, truncated, rejected, token_level
        ((3, 3, 3, False, False, True), (True, False, False, False)),  # accepted whole step
        ((3, 3, 3, False, False, False), (True, False, True, False)),  # fallback target: regenerate
        ((5, 3, 3, True, False, False), (True, False, False, True)),  # fallback speculative
        ((5, 3, 3, True, False, True), (True, False, False, False)),  # accepted, tail token-level
        ((2, 2, 4, False, False, True), (False, True, False, True)),  # the scheduler cut the step
        ((3, 3, 3, True, True, True), (False, False, False, True)),  # finishing a rejected step
        ((3, 0, 0, True, False, False), (False, False, False, True)),  # no step in the row
        ((0, 0, 0, False, False, False), (False, False, False, False)),  # no drafts at all
    ]
    n, step, proposed, spec, in_token, accepted = (list(col) for col in zip(*(c for c, _ in cases)))
    facts = _RowFacts(n, step, proposed, spec, in_token)
    outcome = facts.outcome(np.asarray(accepted) & facts.judged)
    got = list(zip(facts.judged.tolist(), facts.truncated.tolist(), outcome.rejected.tolist(),
                   outcome.token_level.tolist()))
    assert got == [expected for _, expected in cases]
