"""benchmarks/sequential_ab.py end to end: engines in their own processes, interleaved per prompt."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sequential_ab_times_every_engine_on_the_same_prompts(tmp_path):
    out = tmp_path / "ab.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/sequential_ab.py", "--n", "3", "--warmup", "1",
         "--max-tokens", "48", "--engine", "sd=.:sd", "--engine", "sg=.:specguard",
         "--engine", "plain=.:target", "--engine", "sd2=.:sd@2", "--json", str(out)],
        check=False, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| sg | specguard |" in result.stdout and "÷ sd" in result.stdout
    report = json.loads(out.read_text())
    rows = {r["engine"]: r for r in report["rows"]}
    assert list(rows) == ["sd", "sg", "plain", "sd2"] and report["n"] == 3
    assert rows["sd2"]["kind"] == "sd@2" and rows["sd"]["kind"] == "sd"
    # Greedy SD is lossless at any K: the same texts as the target alone.
    assert rows["sd2"]["texts_md5"] == rows["sd"]["texts_md5"] == rows["plain"]["texts_md5"]
    for row in rows.values():
        assert row["requests"] == 3 and 0 < row["tokens"] <= 3 * 48
        assert row["seconds"] > 0 and row["vs"] == "sd" and len(row["texts_md5"]) == 10
        assert row["code"] == row["root"] == str(REPO)  # each engine runs its root's code
    assert rows["sd"]["ratio"] == 1.0


@pytest.mark.parametrize("engine, message", [
    ("x=.:bogus", "KIND must be one of"), ("x.:sd", "expected NAME=ROOT:KIND"),
    ("x=/nonexistent:sd", "has no configs/specguard.yaml"),
    ("x=.:sd@0", "only sd takes @K"), ("x=.:target@4", "only sd takes @K")])
def test_a_bad_engine_is_refused_naming_it(engine, message):
    result = subprocess.run([sys.executable, "benchmarks/sequential_ab.py", "--engine", engine],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2 and message in result.stderr and engine in result.stderr
