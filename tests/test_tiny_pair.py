"""The committed tiny pair: loads offline, answers in the task's format, serves in vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specguard_vllm.tasks import generate, grade_solution
from specguard_vllm.training.tokenizer import prompt_text

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET = REPO_ROOT / "models" / "tiny-target"
DRAFT = REPO_ROOT / "models" / "tiny-draft"
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)


@pytest.fixture(scope="module")
def test_problems():
    return generate("test", 40, seed=123)


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_pair_is_small_and_shares_vocab_with_vllm_cpu_head_dims():
    total = sum(f.stat().st_size for d in (TARGET, DRAFT) for f in d.iterdir() if f.is_file())
    assert total < 60 * 2**20
    t, d = _config(TARGET), _config(DRAFT)
    assert t["architectures"] == d["architectures"] == ["LlamaForCausalLM"]
    assert t["vocab_size"] == d["vocab_size"]
    for cfg in (t, d):
        assert cfg["head_dim"] in VLLM_CPU_HEAD_DIMS
        assert cfg["hidden_size"] == cfg["num_attention_heads"] * cfg["head_dim"]
    for path in (TARGET, DRAFT):
        assert (path / "model.safetensors").is_file()


@pytest.mark.parametrize("path, min_accuracy", [(TARGET, 0.8), (DRAFT, 0.2)],
                         ids=["target", "draft"])
def test_model_loads_offline_and_writes_well_formed_solutions(path, min_accuracy,
                                                              test_problems, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from specguard_vllm.training.evaluate import decode, greedy_solutions, load, prompt_ids

    tok, model = load(path)
    chat = tok.apply_chat_template([{"role": "user", "content": test_problems[0].question}],
                                   add_generation_prompt=True, tokenize=False)
    assert chat == prompt_text(test_problems[0].question)
    texts = decode(tok, greedy_solutions(model, prompt_ids(tok, test_problems)))
    grades = [grade_solution(p, t) for p, t in zip(test_problems, texts)]
    # format: every solution is step lines the grader can read, then `Answer: N`
    assert sum(g.well_formed for g in grades) >= 0.95 * len(grades), texts[:3]
    assert sum(g.correct for g in grades) >= min_accuracy * len(grades)


def test_eval_pair_json_last_line_has_the_contract_keys():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-m", "specguard_vllm.training.commands", "eval-pair", "--n", "16",
         "--json", "--threads", "1"],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600, check=True,
    ).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report["n"] == 16
    for name in ("target", "draft"):
        assert 0.0 <= report[name]["accuracy"] <= 1.0
        assert 0.0 <= report[name]["step_error_rate"] <= 1.0
    assert 0.0 < report["agreement"] <= 1.0


@pytest.mark.slow
def test_vllm_serve_target_answers_chat_in_task_format(tmp_path):
    """vLLM serves the target faithfully: well-formed solutions, same greedy text as HF."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("vllm")
    from specguard_vllm.training.evaluate import decode, greedy_solutions, load, prompt_ids
    from specguard_vllm.serving import vllm_server

    problems = generate("test", 6, seed=321)
    tok, model = load(TARGET)
    hf_texts = decode(tok, greedy_solutions(model, prompt_ids(tok, problems)))
    with vllm_server(TARGET, "--served-model-name", "tiny-target",
                     scratch_dir=tmp_path) as base_url:
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused")
        texts = []
        for p in problems:
            reply = client.chat.completions.create(
                model="tiny-target", messages=[{"role": "user", "content": p.question}],
                max_tokens=160, temperature=0.0,
            )
            assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
            texts.append(reply.choices[0].message.content)
    grades = [grade_solution(p, t) for p, t in zip(problems, texts)]
    assert all(g.well_formed for g in grades), texts
    # fp32 kernels differ slightly, so allow one near-tie to flip a phrasing choice
    assert sum(v == h for v, h in zip(texts, hf_texts)) >= len(problems) - 1, (texts, hf_texts)
