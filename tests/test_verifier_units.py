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
