"""SpecGuard's Prometheus metrics, recorded in the worker where decisions happen.

vLLM serves ``/metrics`` from the API server; worker-side metrics reach it
through prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``,
which vLLM sets up for ``vllm serve``). vLLM's own ``vllm:spec_decode_*``
counters keep counting drafts and accepted tokens: a step accepted is all its
draft tokens accepted, a step rejected is none.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import torch

LPBV_BUCKETS = (-20.0, -10.0, -5.0, -3.0, -2.0, -1.0, -0.5, -0.25, -0.1, -0.01, 0.0)
UNIT_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
TIME_BUCKETS = (1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5)


def observe_many(histogram, values: torch.Tensor) -> None:
    """``histogram.observe(v)`` for every ``v`` of ``values`` (a labelled prometheus_client
    Histogram child), in one increment per non-empty bucket and one of the sum.

    ``observe`` puts ``v`` in the first bucket whose upper bound is >= v; ``bucketize``
    (right=False) gives that index. Reads the child's ``_upper_bounds``, ``_buckets`` and
    ``_sum`` (prometheus_client's layout since 0.4; tests compare the exposition with
    per-value ``observe``); without them it falls back to ``observe`` per value.
    """
    if values.numel() == 0:
        return
    bounds, buckets = getattr(histogram, "_upper_bounds", None), getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values.tolist():
            histogram.observe(value)
        return
    values = values.to(torch.float64)
    index = torch.bucketize(values, torch.tensor(bounds, dtype=torch.float64))
    counts = torch.bincount(index, minlength=len(bounds) + 1)[: len(bounds)]  # past +Inf: NaN
    total.inc(float(values.sum()))
    for i in counts.nonzero().view(-1).tolist():
        buckets[i].inc(int(counts[i]))


@dataclass
class StepCounters:
    """Plain in-process totals (for `collective_rpc` readers such as the benchmark)."""

    steps_accepted: int = 0
    steps_rejected: int = 0
    draft_tokens_accepted: int = 0
    draft_tokens_proposed: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    grounding_seconds: float = 0.0
    draft_calls: int = 0
    draft_forward_passes: int = 0  # batched passes: a pass over B*k candidate rows counts once
    draft_candidate_rows: int = 0  # per call, per request: k, or 1 with SpecGuard off for it
    draft_row_positions: int = 0  # rows sampled summed over positions (row compaction shrinks it)
    draft_row_positions_uncompacted: int = 0  # the same had every row drafted every position
    verify_calls: int = 0
    decisions: list = field(default_factory=list)  # (lpbv, abgv, score, accepted), bounded

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "decisions"}


class SpecGuardMetrics:
    MAX_KEPT_DECISIONS = 100_000

    def __init__(self, model_name: str = ""):
        from prometheus_client import Counter, Gauge, Histogram

        labels = ["model_name"]
        self._model = model_name
        self._lock = threading.Lock()
        self.counters = StepCounters()
        self.steps = Counter("specguard_steps", "SpecGuard verified steps by decision",
                             labels + ["decision"])
        self.lpbv = Histogram("specguard_lpbv", "Step confidence: min target token log-prob",
                              labels, buckets=LPBV_BUCKETS)
        self.abgv = Histogram("specguard_abgv", "Step grounding: min rolled-out attention mass "
                              "on the context", labels, buckets=UNIT_BUCKETS)
        self.score = Histogram("specguard_score", "Step score beta*LPBV_norm+(1-beta)*ABGV",
                               labels, buckets=UNIT_BUCKETS)
        self.draft_time = Histogram("specguard_draft_seconds", "Time to draft and select one "
                                    "batch of candidate steps", labels, buckets=TIME_BUCKETS)
        self.tracked = Gauge("specguard_tracked_requests", "Requests with SpecGuard step state "
                             "in the worker (0 when idle: nothing leaks)", labels,
                             multiprocess_mode="livesum")
        self.verify_time = Histogram("specguard_verify_seconds", "Time of the step decision "
                                     "(scoring and sampling) per batch", labels, buckets=TIME_BUCKETS)
        # The labelled children, looked up once (``labels()`` costs a dict lookup and a lock).
        self._accepted = self.steps.labels(model_name, "accepted")
        self._rejected = self.steps.labels(model_name, "rejected")
        self._lpbv = self.lpbv.labels(model_name)
        self._abgv = self.abgv.labels(model_name)
        self._score = self.score.labels(model_name)
        self._verify_time = self.verify_time.labels(model_name)

    def observe_verification(self, lpbv: torch.Tensor, abgv: torch.Tensor | None,
                             score: torch.Tensor, accepted: torch.Tensor, seconds: float) -> None:
        """One engine step's judged steps (host ``[J]`` tensors; ``abgv`` None: grounding
        skipped, beta = 1), recorded in a few bucket increments, not one Python call per
        step verified (at batch 64, per-step ``observe`` calls took ~0.5 ms an engine step)."""
        with self._lock:
            num_accepted = int(accepted.sum())
            num_rejected = accepted.numel() - num_accepted
            if num_accepted:
                self._accepted.inc(num_accepted)
            if num_rejected:
                self._rejected.inc(num_rejected)
            observe_many(self._lpbv, lpbv.clamp(min=-1e9))
            if abgv is not None:
                observe_many(self._abgv, abgv)
            observe_many(self._score, score)
            self.counters.steps_accepted += num_accepted
            self.counters.steps_rejected += num_rejected
            room = self.MAX_KEPT_DECISIONS - len(self.counters.decisions)
            if room > 0 and accepted.numel():
                kept = [lpbv[:room].tolist(), [None] * min(room, lpbv.numel()) if abgv is None
                        else abgv[:room].tolist(), score[:room].tolist(),
                        accepted[:room].bool().tolist()]
                self.counters.decisions.extend(zip(*kept))
            self.counters.verify_seconds += seconds
            self.counters.verify_calls += 1
            self._verify_time.observe(seconds)

    def add_grounding_time(self, seconds: float) -> None:
        with self._lock:
            self.counters.grounding_seconds += seconds

    def set_tracked(self, count: int) -> None:
        self.tracked.labels(self._model).set(count)

    def observe_draft(self, seconds: float, forward_passes: int = 0, candidate_rows: int = 0,
                      row_positions: int = 0) -> None:
        with self._lock:
            self.counters.draft_seconds += seconds
            self.counters.draft_calls += 1
            self.counters.draft_forward_passes += forward_passes
            self.counters.draft_candidate_rows += candidate_rows
            self.counters.draft_row_positions += row_positions
            self.counters.draft_row_positions_uncompacted += candidate_rows * forward_passes
            self.draft_time.labels(self._model).observe(seconds)


def enable_worker_metrics() -> None:
    """Let SpecGuard's worker-side metrics reach the API server's ``/metrics``.

    They are recorded in the worker process; prometheus_client's multiprocess
    mode (which vLLM itself uses with several API servers) merges them. Metrics
    created from here on in this process use the multiprocess value class too.
    """
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        return
    from vllm.v1.metrics.prometheus import setup_multiprocess_prometheus

    setup_multiprocess_prometheus()
    from prometheus_client import values

    values.ValueClass = values.get_value_class()


# prometheus_client registers metric names process-wide and refuses a second set, so
# every runner in a process shares one metrics object (and its counters).
_METRICS: SpecGuardMetrics | None = None


def get_metrics(model_name: str = "") -> SpecGuardMetrics:
    """One metrics object per process (Prometheus refuses duplicate metric names)."""
    global _METRICS
    if _METRICS is None:
        _METRICS = SpecGuardMetrics(model_name)
    return _METRICS
