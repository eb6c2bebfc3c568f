"""`specguard bench`: configuration matrix, figures, report, and one real run on the bundled pair."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specguard_vllm.config import load_config
from specguard_vllm.evaluation.bench_configs import TAU_SWEEP, build_matrix
from specguard_vllm.evaluation.bench_metrics import (
    COST_RATIOS,
    ProblemResult,
    add_comparisons,
    paired_outcomes,
    summarise,
    wilson_interval,
)
from specguard_vllm.evaluation.bench_report import markdown_table, write_report

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/specguard.yaml"


def test_full_matrix_covers_the_issue_configurations():
    config = load_config(CONFIG)
    engines, configs = build_matrix(config)
    names = [c.name for c in configs]
    base = config.specguard
    other = "target" if base.fallback == "speculative" else "speculative"
    for required in ("target", "sd", "specguard", f"specguard-fallback-{other}", "lpbv-only",
                     "abgv-only"):
        assert required in names
    by_name = {c.name: c for c in configs}
    assert by_name["lpbv-only"].overrides == {"beta": 1.0}
    assert by_name["abgv-only"].overrides == {"beta": 0.0}
    assert {c.params["k"] for c in configs if c.params} == {1, 2, 4}
    assert {c.params["tau"] for c in configs if c.group in ("tau", "specguard")} == \
        set(TAU_SWEEP) | {base.tau}
    keys = [e.key for e in engines]
    assert len(keys) == len(set(keys)), "one engine per engine configuration"
    sd = next(e for e in engines if e.key == "sd").speculative_config
    assert sd["method"] == "draft_model"
    assert sd["num_speculative_tokens"] == config.num_speculative_tokens
    assert Path(sd["model"]).resolve() == (REPO / config.model).resolve() or \
        Path(sd["model"]).name == Path(config.model).name
    for engine in engines:
        if engine.key.startswith("specguard-k"):
            k = int(engine.key.rsplit("k", 1)[1])
            assert engine.speculative_config["specguard"]["num_candidates"] == k


def test_quick_matrix_and_subset_and_unknown_name():
    config = load_config(CONFIG)
    _, quick = build_matrix(config, quick=True)
    names = {c.name for c in quick}
    assert {"target", "sd", "specguard"} <= names and len(names) == 4
    engines, only = build_matrix(config, only=["target", "specguard"])
    assert [c.name for c in only] == ["target", "specguard"]
    assert {e.key for e in engines} == {"target", f"specguard-k{config.specguard.num_candidates}"}
    with pytest.raises(ValueError, match="nope"):
        build_matrix(config, only=["nope"])


def test_sd_at_other_k_gets_its_own_engine_and_draft_count():
    """--sd-k 3: vLLM's SD at K = 3 beside sd at the config's K, each its own engine, and
    a round of it counts 3 draft passes, not num_speculative_tokens."""
    from specguard_vllm.evaluation.bench import _problem_result
    from specguard_vllm.evaluation.bench_configs import sd_num_spec

    config = load_config(CONFIG)
    engines, configs = build_matrix(config, only=["sd", "sd-k3"], sd_ks=[3])
    specs = {e.key: e.speculative_config for e in engines}
    assert specs["sd"]["num_speculative_tokens"] == config.num_speculative_tokens
    assert specs["sd-k3"] == {**specs["sd"], "num_speculative_tokens": 3}
    by_name = {c.name: c for c in configs}
    assert sd_num_spec(by_name["sd-k3"], 16) == 3 and sd_num_spec(by_name["sd"], 16) == 16
    answer = {"text": "", "token_ids": [1, 2], "latency_s": 1.0,
              "engine": {"num_drafts": 5, "iterations": 6, "num_accepted_tokens": 4,
                         "num_draft_tokens": 15}}
    row = _problem_result(by_name["sd-k3"], SimpleNamespace(id="p"), answer, 16, lambda *_: True)
    assert row.draft_forwards == 15


def _result(config, i, *, correct=True, tokens=10, target=10, draft=0, accepted=0, proposed=0,
            latency=1.0):
    return ProblemResult(config, f"p{i}", correct, tokens, latency, 0.1, target, draft, accepted,
                         proposed)


def test_figures_and_modelled_speedup_from_counts():
    results = {
        "target": [_result("target", i) for i in range(4)],
        # Half the target passes per token and 3 draft passes per target pass.
        "sd": [_result("sd", i, target=5, draft=15, accepted=5, proposed=8) for i in range(4)],
    }
    rows = add_comparisons([summarise(name, rs) for name, rs in results.items()])
    target, sd = rows
    assert target["tokens_per_target_forward"] == 1.0
    assert all(v == pytest.approx(1.0) for v in target["modelled_speedup"].values())
    assert sd["tokens_per_target_forward"] == 2.0
    for c in COST_RATIOS:
        assert sd["modelled_speedup"][f"{c:g}"] == pytest.approx(40 / (20 + c * 60))
    assert sd["draft_token_share"] == pytest.approx(0.5)
    assert sd["draft_token_acceptance"] == pytest.approx(5 / 8)
    assert sd["tokens_per_target_forward_vs_sd"] == pytest.approx(1.0)
    assert target["tokens_per_target_forward_vs_sd"] == pytest.approx(0.5)
    assert sd["accuracy_vs_target_points"] == 0.0


def test_errors_are_counted_not_averaged_in():
    rs = [_result("x", 0), ProblemResult("x", "p1", False, 0, 0.0, None, 0, 0, 0, 0, error="boom")]
    row = summarise("x", rs)
    assert row["n"] == 1 and row["errors"] == 1 and row["accuracy"] == 1.0


def test_paired_outcomes_count_disagreements():
    results = {"target": [_result("target", 0, correct=True), _result("target", 1, correct=False)],
               "sg": [_result("sg", 0, correct=False), _result("sg", 1, correct=True)]}
    assert paired_outcomes(results)["sg"] == {"right_where_target_wrong": 1,
                                              "wrong_where_target_right": 1}


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 500), data=st.data())
def test_wilson_interval_contains_the_estimate(n, data):
    k = data.draw(st.integers(0, n))
    low, high = wilson_interval(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0


@settings(max_examples=100, deadline=None)
@given(target=st.integers(1, 200), draft=st.integers(0, 400), tokens=st.integers(1, 400))
def test_modelled_speedup_falls_as_draft_cost_rises(target, draft, tokens):
    rows = add_comparisons([summarise("target", [_result("target", 0, tokens=50, target=50)]),
                            summarise("x", [_result("x", 0, tokens=tokens, target=target,
                                                    draft=draft)])])
    speedups = [rows[1]["modelled_speedup"][f"{c:g}"] for c in COST_RATIOS]
    assert all(a >= b for a, b in itertools.pairwise(speedups))
    assert speedups[0] <= tokens / target + 1e-9


def test_report_writes_table_and_plots(tmp_path):
    rs = {name: [_result(name, i, target=t, draft=d) for i in range(3)]
          for name, t, d in (("target", 10, 0), ("sd", 4, 30), ("specguard", 5, 20), ("tau=0.7", 6, 20))}
    rows = [summarise(name, r, group={"target": "baseline", "sd": "baseline"}.get(name, "tau"),
                      params={"tau": 0.5 if name == "specguard" else 0.7})
            for name, r in rs.items()]
    rows[2]["group"] = "specguard"
    add_comparisons(rows)
    written = write_report(rows, tmp_path, title="t")
    names = {p.name for p in written}
    assert {"bench.md", "accuracy_vs_latency.png", "tau_sweep.png"} <= names
    for path in written:
        assert path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = markdown_table(rows)
    assert table.count("\n| ") == 1 + len(rows)  # header + one line per row
    assert "| sd | 3 |" in table


def test_throughput_plot_needs_two_concurrency_levels(tmp_path):
    def served(name, level, tokens_per_s):
        row = summarise(name, [_result(name, 0)], mode=f"server-c{level}")
        row["tokens_per_s"] = tokens_per_s
        return row

    one_level = add_comparisons([served("sd", 1, 100.0), served("specguard", 1, 120.0)])
    assert "throughput_vs_concurrency.png" not in {p.name for p in write_report(one_level, tmp_path / "a")}
    levels = add_comparisons([served(name, c, rate * c) for c in (1, 8, 32)
                              for name, rate in (("sd", 10.0), ("specguard", 12.0))])
    written = {p.name: p for p in write_report(levels, tmp_path / "b")}
    assert written["throughput_vs_concurrency.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_concurrency_levels():
    from specguard_vllm.evaluation.bench import parse_concurrencies

    assert parse_concurrencies("8") == [1, 8]
    assert parse_concurrencies("1") == [1]
    assert parse_concurrencies("64, 8,32,1") == [1, 8, 32, 64]
    assert parse_concurrencies("8,32") == [8, 32]
    for bad in ("0", "1,-2", "x", "1,,2"):
        with pytest.raises(ValueError, match="--concurrency"):
            parse_concurrencies(bad)


@pytest.mark.parametrize("args,message", [
    (["--n", "0"], "--n"),
    (["--configs", "target,bogus"], "bogus"),
    (["--dataset", "math"], "MATH"),
    (["--target", "/nonexistent/model"], "/nonexistent/model"),
    (["--server", "--concurrency", "1,zero"], "--concurrency"),
    (["--server", "--repeats", "0"], "--repeats"),
    (["--sd-k", "4,x"], "--sd-k"),
    (["--sd-k", "0"], "--sd-k"),
])
def test_bad_arguments_exit_2_with_a_message(args, message):
    result = subprocess.run([sys.executable, "-m", "specguard_vllm.cli", "bench", *args],
                            check=False, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_bench_runs_the_real_engines_and_writes_json(tmp_path):
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "specguard_vllm.cli", "bench", "--n", "3",
           "--configs", "target,sd,specguard", "--json", str(out), "--out-dir", str(tmp_path)]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.loads(out.read_text())
    assert [r["config"] for r in rows] == ["target", "sd", "specguard"]
    for row in rows:
        for key in ("config", "accuracy", "tokens_per_s", "latency_s_per_problem",
                    "step_acceptance", "tokens_per_target_forward"):
            assert key in row
        assert row["n"] == 3 and row["errors"] == 0
        assert 0.0 <= row["accuracy"] <= 1.0 and row["tokens_per_s"] > 0
    by = {r["config"]: r for r in rows}
    # Target-only: the prefill emits the first token, then one token per forward pass.
    assert by["target"]["tokens_per_target_forward"] == pytest.approx(1.0)
    assert by["target"]["draft_forwards"] == 0
    assert by["sd"]["tokens_per_target_forward"] > 1.0 and by["sd"]["draft_forwards"] > 0
    assert by["specguard"]["steps_verified"] > 0
    assert 0.0 <= by["specguard"]["step_acceptance"] <= 1.0
    assert not math.isnan(by["specguard"]["tokens_per_target_forward"])
    problems = [json.loads(line) for line in (tmp_path / "problems.jsonl").read_text().splitlines()]
    assert len(problems) == 9
    assert (tmp_path / "accuracy_vs_latency.png").exists()
    assert "| specguard |" in result.stdout


def test_calibrated_config_runs_on_the_base_engine_and_refuses_other_k(tmp_path):
    config = load_config(CONFIG)
    tuned = config.model_copy(update={"specguard": config.specguard.model_copy(
        update={"tau": 0.42, "beta": 0.8})})
    engines, configs = build_matrix(config, only=["calibrated"], calibrated={"calibrated": tuned})
    assert [c.name for c in configs] == ["calibrated"]
    assert configs[0].overrides == {"tau": 0.42, "beta": 0.8}
    assert [e.key for e in engines] == [f"specguard-k{config.specguard.num_candidates}"]
    other_k = config.model_copy(update={"specguard": config.specguard.model_copy(
        update={"num_candidates": 1})})
    with pytest.raises(ValueError, match="num_candidates"):
        build_matrix(config, calibrated={"calibrated-k1": other_k})


def test_render_redoes_tables_and_plots_from_saved_rows(tmp_path):
    rs = {name: [_result(name, i, target=t, draft=d) for i in range(2)]
          for name, t, d in (("target", 10, 0), ("sd", 4, 30))}
    rows = add_comparisons([summarise(n, r, group="baseline") for n, r in rs.items()])
    served = summarise("sd", rs["sd"], mode="server-c4", group="baseline")
    rows.append(served)
    saved = tmp_path / "rows.json"
    saved.write_text(json.dumps(rows))
    result = subprocess.run([sys.executable, "-m", "specguard_vllm.cli", "bench", "--render",
                             str(saved), "--out-dir", str(tmp_path / "out")],
                            check=False, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    again = json.loads(saved.read_text())
    assert again[1]["modelled_speedup"] == rows[1]["modelled_speedup"]
    assert again[2]["target_forwards"] is None and again[2]["modelled_speedup"]["0.02"] is None
    assert (tmp_path / "out/bench.md").exists() and (tmp_path / "out/accuracy_vs_latency.png").exists()
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    refused = subprocess.run([sys.executable, "-m", "specguard_vllm.cli", "bench", "--render",
                              str(bad)], check=False, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert refused.returncode == 2 and "bench rows" in refused.stderr


def test_labelled_delta_sums_over_other_labels():
    from specguard_vllm.evaluation.bench import _labelled_delta

    before = {'specguard_steps_total{decision="accepted",model_name="m"}': 2.0}
    after = {'specguard_steps_total{decision="accepted",model_name="m"}': 5.0,
             'specguard_steps_total{decision="rejected",model_name="m"}': 4.0,
             "specguard_steps_total": 9.0}
    assert _labelled_delta(before, after, "specguard_steps_total", 'decision="accepted"') == 3.0
    assert _labelled_delta(before, after, "specguard_steps_total", 'decision="rejected"') == 4.0


@pytest.mark.slow
def test_bench_against_a_running_server(tmp_path):
    """`--server-url`: the configurations a running SpecGuard server can serve via vllm_xargs."""
    from specguard_vllm.serving import vllm_server

    out = tmp_path / "served.json"
    with vllm_server(REPO / "models/tiny-target", "--speculative-config", str(CONFIG),
                     "--served-model-name", "tiny", scratch_dir=tmp_path) as url:
        result = subprocess.run(
            [sys.executable, "-m", "specguard_vllm.cli", "bench", "--server-url", url,
             "--skip-offline", "--n", "2", "--concurrency", "2", "--configs", "specguard,lpbv-only",
             "--repeats", "2",
             "--json", str(out), "--out-dir", str(tmp_path / "out"), "--no-plots"],
            check=False, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.loads(out.read_text())
    assert sorted((r["config"], r["mode"]) for r in rows) == sorted(
        (c, m) for c in ("specguard", "lpbv-only") for m in ("server-c1", "server-c2"))
    for row in rows:
        assert row["n"] == 2 and row["errors"] == 0
        assert row["step_acceptance"] is not None and row["target_forwards"] is None
        assert row["repeats"] == 2 and len(row["tokens_per_s_runs"]) == 2
        assert min(row["tokens_per_s_runs"]) <= row["tokens_per_s"] <= max(row["tokens_per_s_runs"])


def test_served_row_takes_the_median_of_its_rounds_and_counts_every_rounds_errors():
    from specguard_vllm.evaluation.bench import _served_row
    from specguard_vllm.evaluation.bench_configs import BenchConfig
    from specguard_vllm.evaluation.bench_metrics import ProblemResult

    def run(wall, tokens, error=None, accepted=3.0, rejected=1.0):
        results = [ProblemResult("sd", "a", True, tokens, 0.5, 0.1, 0, 0, 0, 0),
                   ProblemResult("sd", "b", error is None, 0 if error else tokens, 0.5, 0.1,
                                 0, 0, 0, 0, error=error)]
        return {"results": results, "wall": wall, "steps_accepted": accepted,
                "steps_rejected": rejected, "accepted_draft_tokens": tokens,
                "engine_iterations": 10.0 * wall}

    config = BenchConfig(name="sd", engine="sd", group="baseline")
    runs = [run(2.0, 100), run(1.0, 100, error="boom"), run(4.0, 100)]
    row = _served_row(config, 8, runs)
    assert row["mode"] == "server-c8" and row["repeats"] == 3
    assert row["tokens_per_s_runs"] == [100.0, 100.0, 50.0]  # the failed request's tokens are 0
    assert row["tokens_per_s"] == 100.0 and row["wall_s"] == 2.0
    assert row["errors"] == 1  # from the second round, though accuracy is the first round's
    assert row["accuracy"] == 1.0 and row["n"] == 2
    assert row["step_acceptance"] == 9.0 / 12.0
    assert row["engine_iterations"] == 20.0
