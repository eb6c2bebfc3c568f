"""SpecGuard's engine step on CUDA makes no host sync but its named reads (issue 14).

Runs where a CUDA device is present (``-m gpu``); skipped on CPU. The engine runs in a
subprocess (vLLM's CUDA state stays out of pytest's process).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_engine_step_under_sync_debug_error():
    config = REPO / "configs" / "specguard.paper.yaml"  # beta 0.5: grounding runs too
    result = subprocess.run(
        [sys.executable, "-m", "tests.gpu_sync_runner", str(REPO / "models/tiny-target"),
         str(config), str(REPO / "models/tiny-draft")],
        cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-6000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["outputs"] == 8 and report["steps"] > 0
    reads = report["max_reads_per_step"]
    # One read each of the verifier's results, the committed tokens and the drafted rows.
    for site in ("verify_results", "committed_tokens", "drafted_rows"):
        assert reads.get(site, 0) <= 1, reads
    assert report["total_reads"].get("verify_results", 0) > 0, report
    # The lagged early-stop flags (step ends; tails stopped by tail_min_prob, which the
    # paper config sets): at most one each per draft position.
    from specguard_vllm.config import load_config

    K = load_config(config).num_speculative_tokens
    assert reads.get("step_end_poll", 0) <= K and reads.get("tail_poll", 0) <= K, reads
    assert set(reads) <= {"verify_results", "committed_tokens", "drafted_rows", "step_end_poll",
                          "tail_poll"}
