"""The offline vLLM engine session `specguard calibrate` decodes its problems with.

One SpecGuard engine serves every phase: each request carries its own ``tau``/``beta``/
``fallback`` as ``extra_args``, and the worker's decision log (``SPECGUARD_DECISION_LOG``)
says what it decided for every step of every request.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from specguard_vllm.evaluation.calibrate import CannotCalibrate
from specguard_vllm.trace_records import read_decision_log, request_key


@dataclass
class Decoded:
    """One decode of every problem under one set of per-request overrides."""

    texts: list[str]
    correct: list[bool]
    entries: list[list[dict]]  # decision-log entries per request
    full_ids: list[list[int]]
    req_keys: list[str]
    seconds: float

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)

    @property
    def n_steps(self) -> int:
        return sum(len(e) for e in self.entries)

    @property
    def n_accepted(self) -> int:
        return sum(bool(x["accepted"]) for e in self.entries for x in e)

    @property
    def acceptance(self) -> float:
        return self.n_accepted / self.n_steps if self.n_steps else float("nan")

    def summary(self) -> dict:
        return {"accuracy": self.accuracy, "acceptance": self.acceptance,
                "n_correct": sum(self.correct), "n_problems": len(self.correct),
                "n_steps": self.n_steps, "n_accepted": self.n_accepted,
                "n_rejected": self.n_steps - self.n_accepted,
                "seconds": self.seconds, "request_ids": self.req_keys}

    def brief(self) -> dict:
        """`summary` without the request ids (what the report's measured rows show)."""
        s = self.summary()
        s.pop("request_ids")
        return s


@dataclass
class Prepared:
    """The items whose prompts fit the target, their prompt ids and token budgets."""

    items: list
    prompts: list[list[int]]
    max_tokens: list[int]  # per item: the asked budget, cut to what its prompt leaves
    skipped: int  # items whose prompt leaves no room to generate
    max_model_len: int
    tokenizer: object

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def prepare(target: str, items, max_tokens: int) -> Prepared:
    """Prompt ids (chat template when the target has one), dropping prompts too long."""
    from transformers import AutoConfig, AutoTokenizer

    from specguard_vllm.evaluation.datasets import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(target)
    max_len = int(getattr(AutoConfig.from_pretrained(target), "max_position_embeddings", 2048))
    kept, prompts, budgets = [], [], []
    for item in items:
        ids = prompt_ids(item, tokenizer)
        if len(ids) < max_len:
            kept.append(item)
            prompts.append(ids)
            budgets.append(min(max_tokens, max_len - len(ids)))
    if not kept:
        raise CannotCalibrate(f"no prompt fits the target's {max_len}-token context "
                              f"({len(items)} items)")
    return Prepared(kept, prompts, budgets, len(items) - len(kept), max_len, tokenizer)


@dataclass
class Session:
    """A SpecGuard engine over prepared prompts; `run` decodes all of them per override set."""

    llm: object
    data: Prepared
    log_path: Path

    def run(self, overrides: list[dict], grade: Callable[[int, str], bool]) -> list[Decoded]:
        """Decode every problem once per override set, all in one generate call."""
        from vllm import SamplingParams

        requests, params = [], []
        for extra in overrides:
            for ids, budget in zip(self.data.prompts, self.data.max_tokens):
                requests.append({"prompt_token_ids": ids})
                params.append(SamplingParams(temperature=0.0, max_tokens=budget,
                                             extra_args=dict(extra)))
        started = time.perf_counter()
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        seconds = time.perf_counter() - started
        log = read_decision_log(self.log_path, steps_only=True)
        results = []
        n = len(self.data.prompts)
        for g in range(len(overrides)):
            texts, correct, entries, full, keys = [], [], [], [], []
            for i, out in enumerate(outputs[g * n: (g + 1) * n]):
                gen = list(out.outputs[0].token_ids)
                text = self.data.decode(gen)
                key = request_key(out.request_id)
                texts.append(text)
                correct.append(bool(grade(i, text)))
                entries.append(list(log.get(key, [])))
                full.append(list(out.prompt_token_ids) + gen)
                keys.append(key)
            results.append(Decoded(texts, correct, entries, full, keys, seconds))
        return results

    def close(self) -> None:
        from specguard_vllm.engine_trace import shutdown_llm

        shutdown_llm(self.llm)


def open_session(target: str, config, data: Prepared, *, log_path: Path, max_num_seqs: int,
                 seed: int = 0) -> Session:
    """Start the SpecGuard engine; its worker logs every step decision to ``log_path``."""
    os.environ["SPECGUARD_DECISION_LOG"] = str(log_path)
    from specguard_vllm.engine_trace import make_llm

    llm = make_llm(target, config, max_model_len=data.max_model_len, seed=seed,
                   max_num_seqs=max_num_seqs)
    return Session(llm, data, log_path)


def continue_greedily(target: str, prompts: list[list[int]], max_tokens: list[int], *,
                      max_model_len: int, max_num_seqs: int, seed: int = 0) -> list[list[int]]:
    """The target's own greedy continuation of every prompt: one target-only engine with
    prefix caching (continuations of one problem share its prompt and trajectory), all
    prompts in one batched generate call, with vLLM's progress bar."""
    if not prompts:
        return []
    from vllm import SamplingParams

    from specguard_vllm.engine_trace import make_llm, shutdown_llm

    llm = make_llm(target, None, max_model_len=max_model_len, seed=seed,
                   max_num_seqs=max_num_seqs, enable_prefix_caching=True)
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               [SamplingParams(temperature=0.0, max_tokens=m) for m in max_tokens],
                               use_tqdm=True)
    finally:
        shutdown_llm(llm)
    return [list(o.outputs[0].token_ids) for o in outputs]
