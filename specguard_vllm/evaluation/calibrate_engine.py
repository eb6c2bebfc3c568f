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
class Session:
    llm: object
    tokenizer: object
    problems: list
    prompts: list[list[int]]
    log_path: Path
    max_tokens: int
    decode: Callable[[list[int]], str]
    segmenter: object

    def run(self, overrides: list[dict]) -> list[Decoded]:
        """Decode every problem once per override set, all in one generate call."""
        from vllm import SamplingParams

        from specguard_vllm.tasks import grade_solution

        requests, params = [], []
        for extra in overrides:
            for ids in self.prompts:
                requests.append({"prompt_token_ids": ids})
                params.append(SamplingParams(temperature=0.0, max_tokens=self.max_tokens,
                                             extra_args=dict(extra)))
        started = time.perf_counter()
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        seconds = time.perf_counter() - started
        log = read_decision_log(self.log_path, steps_only=True)
        results = []
        n = len(self.prompts)
        for g in range(len(overrides)):
            chunk = outputs[g * n: (g + 1) * n]
            texts, correct, entries, full, keys = [], [], [], [], []
            for problem, out in zip(self.problems, chunk):
                gen = list(out.outputs[0].token_ids)
                text = self.decode(gen)
                key = request_key(out.request_id)
                texts.append(text)
                correct.append(bool(grade_solution(problem, text).correct))
                entries.append(list(log.get(key, [])))
                full.append(list(out.prompt_token_ids) + gen)
                keys.append(key)
            results.append(Decoded(texts, correct, entries, full, keys, seconds))
        return results

    def close(self) -> None:
        from specguard_vllm.engine_trace import shutdown_llm

        shutdown_llm(self.llm)


def open_session(target: str, config, problems, *, log_path: Path, max_tokens: int,
                 max_num_seqs: int, seed: int = 0) -> Session:
    """Start the engine; ``max_tokens`` is cut to what the longest prompt leaves room for."""
    os.environ["SPECGUARD_DECISION_LOG"] = str(log_path)
    from transformers import AutoConfig, AutoTokenizer

    from specguard_vllm.core.steps import StepSegmenter
    from specguard_vllm.engine_trace import make_llm
    from specguard_vllm.training.evaluate import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(target)
    max_len = int(getattr(AutoConfig.from_pretrained(target), "max_position_embeddings", 2048))
    prompts = prompt_ids(tokenizer, problems)
    longest = max(map(len, prompts))
    max_tokens = min(max_tokens, max_len - longest)
    if max_tokens < 1:
        raise CannotCalibrate(f"the prompts ({longest} tokens) do not fit the target ({max_len})")
    llm = make_llm(target, config, max_model_len=max_len, seed=seed, max_num_seqs=max_num_seqs)
    return Session(llm, tokenizer, problems, prompts, log_path, max_tokens,
                   decode=lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True),
                   segmenter=StepSegmenter.from_tokenizer(tokenizer,
                                                          config.specguard.step_delimiters))
