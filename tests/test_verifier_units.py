"""The verifier's output assembly in tensor ops, against the row-by-row rule it replaces."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specguard_vllm.plugin.verifier import PLACEHOLDER_TOKEN_ID, SpecGuardRejectionSampler


def row_by_row(num_drafts, drafts, accepted, from_token_rows, next_tokens, token_rows, width):
    out = torch.full((len(num_drafts), width), PLACEHOLDER_TOKEN_ID, dtype=torch.int32)
    offset = 0
    for i, n in enumerate(num_drafts):
        if from_token_rows[i]:
            out[i] = token_rows[i]
        elif accepted[i]:
            out[i, :n] = torch.tensor(drafts[offset:offset + n], dtype=torch.int32)
            out[i, n] = next_tokens[i]
        else:
            out[i, 0] = next_tokens[i]
        offset += n
    return out


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_assemble_equals_the_row_by_row_rule(data):
    max_spec = data.draw(st.integers(1, 6))
    rows = data.draw(st.integers(1, 6))
    num_drafts = data.draw(st.lists(st.integers(0, max_spec), min_size=rows, max_size=rows))
    drafts = data.draw(st.lists(st.integers(0, 99), min_size=sum(num_drafts), max_size=sum(num_drafts)))
    accepted = [n > 0 and data.draw(st.booleans()) for n in num_drafts]
    from_token_rows = [n > 0 and data.draw(st.booleans()) for n in num_drafts]
    next_tokens = data.draw(st.lists(st.integers(100, 199), min_size=rows, max_size=rows))
    width = max_spec + 1
    token_rows = torch.randint(200, 300, (rows, width), dtype=torch.int32)
    metadata = SimpleNamespace(max_spec_len=max_spec,
                               draft_token_ids=torch.tensor(drafts, dtype=torch.int32))
    got = SpecGuardRejectionSampler._assemble(
        metadata, torch.tensor(num_drafts), torch.tensor(accepted), torch.tensor(from_token_rows),
        torch.tensor(next_tokens), token_rows if any(from_token_rows) else None)
    want = row_by_row(num_drafts, drafts, accepted, from_token_rows, next_tokens, token_rows, width)
    assert torch.equal(got, want)


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
