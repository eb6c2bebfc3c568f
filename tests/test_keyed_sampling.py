"""The inverse-CDF pick of the draft's draws (property tests)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specguard_vllm.kernels.draft_sampling_ref import inverse_cdf_sample


@st.composite
def logit_rows(draw):
    """Rows of logits with -inf entries (ids of probability 0) and any width."""
    rows = draw(st.integers(1, 9))
    vocab = draw(st.integers(1, 700))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * draw(st.sampled_from([0.1, 3.0, 30.0]))
    banned = torch.rand(rows, vocab, generator=gen) < draw(st.sampled_from([0.0, 0.5, 0.95]))
    banned[torch.arange(rows), torch.randint(0, vocab, (rows,), generator=gen)] = False
    if vocab > 1 and draw(st.booleans()):
        banned[:, -1] = True  # the last id has no mass: where a rounded-up draw used to land
        banned[:, 0] &= ~banned.all(dim=1)  # every row keeps an id with mass
    return logits.masked_fill(banned, float("-inf")), seed


@settings(max_examples=300, deadline=None)
@given(logit_rows(), st.sampled_from([0.3, 0.7, 1.0, 2.0]))
def test_draw_lands_in_the_interval_of_u_and_never_on_an_id_without_mass(case, temperature):
    logits, seed = case
    rows = logits.shape[0]
    u = torch.rand(rows, generator=torch.Generator().manual_seed(seed + 1)).clamp(1e-7, 1 - 1e-7)
    u[0] = 1.0  # the keyed draws' largest uniform, 1 - 2**-25, is 1.0 in float32
    tokens = inverse_cdf_sample(logits, u, temperature)
    w = torch.softmax(logits.double() / temperature, dim=-1)
    assert w.gather(1, tokens[:, None]).gt(0).all()
    cdf = w.cumsum(dim=-1)
    target = u.double() * cdf[:, -1]
    upper = cdf.gather(1, tokens[:, None]).squeeze(1)
    lower = upper - w.gather(1, tokens[:, None]).squeeze(1)
    slack = 1e-5  # float32 sums against float64 ones
    assert (lower - slack <= target).all() and (target <= upper + slack).all()


def test_draws_follow_the_tempered_distribution():
    """200k stratified uniforms through one row: frequencies within 4 sigma of the weights."""
    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(5)) * 2
    draws = 200_000
    u = ((torch.arange(draws, dtype=torch.float64) + 0.5) / draws).float()
    tokens = inverse_cdf_sample(logits.expand(draws, -1), u, 0.7)
    counts = torch.bincount(tokens, minlength=300).double() / draws
    p = torch.softmax(logits[0].double() / 0.7, dim=-1)
    assert ((counts - p).abs() <= 4 * (p * (1 - p) / draws).sqrt() + 1e-5).all()
