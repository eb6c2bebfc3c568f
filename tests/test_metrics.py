"""SpecGuard's worker metrics: batched histogram observations."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.floats(-30, 2, allow_nan=False), st.sampled_from(
    [-20.0, -1.0, 0.0, 0.5, 1.0, float("inf"), -1e9])), max_size=80))
def test_batched_histogram_observations_expose_what_one_observe_per_value_does(values):
    """metrics.observe_many (a few bucket increments per engine step) against
    prometheus_client's own per-value observe: the same exposition text."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from specguard_vllm.plugin.metrics import LPBV_BUCKETS, observe_many

    texts = []
    for batched in (False, True):
        registry = CollectorRegistry()
        child = Histogram("h", "doc", ["m"], buckets=LPBV_BUCKETS, registry=registry).labels("x")
        if batched:
            observe_many(child, torch.tensor(values, dtype=torch.float64))
        else:
            for value in values:
                child.observe(value)
        texts.append([line for line in generate_latest(registry).decode().splitlines()
                      if "_created" not in line])
    assert texts[0] == texts[1]
