"""benchmarks/engine_overhead.py end to end: both engines, a warm-up round, timed rounds."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_engine_overhead_times_both_engines_in_alternating_rounds(tmp_path):
    out = tmp_path / "overhead.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/engine_overhead.py", "--batches", "1,2", "--max-tokens", "16",
         "--repeats", "2", "--json", str(out)],
        check=False, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| specguard | 2 |" in result.stdout and "ms/step ÷ SD" in result.stdout
    report = json.loads(out.read_text())
    assert report["repeats"] == 2
    rows = {(r["config"], r["batch"]): r for r in report["rows"]}
    assert set(rows) == {(c, b) for c in ("sd", "specguard") for b in (1, 2)}
    for row in rows.values():
        assert row["repeats"] == 2 and row["steps"] > 0 and len(row["step_ms_per_run"]) == 2
        assert 0 < row["draft_forward_ms"] < row["step_ms"] and row["draft_ms"] > 0
        assert row["tokens_per_step"] >= 1.0
    # The rounds are logged as they alternate.
    assert "round 2 sd batch 2" in result.stderr and "round 2 specguard batch 2" in result.stderr
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, "benchmarks/engine_overhead.py", "--repeats", "0"],
                       check=True, capture_output=True, cwd=REPO, timeout=120)
