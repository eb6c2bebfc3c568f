"""Engine steps of SpecGuard on CUDA with ``torch.cuda.set_sync_debug_mode("error")`` over
every part SpecGuard adds to the step (proposer, selector, grounding capture, verifier,
step bookkeeping): any host sync there raises, except the named reads in
``plugin.host_transfer``, which are counted per engine step.

    python -m tests.gpu_sync_runner <target> <config.yaml> <draft>

Prints one JSON line: ``{"steps", "max_reads_per_step": {site: n}, "outputs": n}``.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import sys


def _strict(function):
    import torch

    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return function(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return wrapped


def _refuse_event_waits_when_strict() -> None:
    """CUDA event and stream waits bypass the sync-debug check (cudaEventSynchronize is not
    instrumented), so under the strict mode they raise here too, except inside the named
    reads (``host_transfer.waits_for_device`` lifts the mode there)."""
    import torch

    def guarded(function, what):
        @functools.wraps(function)
        def wait(*args, **kwargs):
            if torch.cuda.get_sync_debug_mode() == 2:
                raise RuntimeError(f"{what} inside SpecGuard's engine step, outside a named read")
            return function(*args, **kwargs)
        return wait

    torch.cuda.Event.synchronize = guarded(torch.cuda.Event.synchronize, "Event.synchronize")
    torch.cuda.Stream.synchronize = guarded(torch.cuda.Stream.synchronize, "Stream.synchronize")
    torch.cuda.synchronize = guarded(torch.cuda.synchronize, "torch.cuda.synchronize")


def main() -> int:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the runner in this process
    target, config_path, draft = sys.argv[1:4]
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from specguard_vllm.config import load_config
    from specguard_vllm.engine_trace import make_llm, shutdown_llm
    from specguard_vllm.evaluation.datasets import load_items, prompt_ids
    from specguard_vllm.plugin import grounding_capture, host_transfer, proposer, runner_state, verifier

    config = load_config(config_path).model_copy(update={"model": draft})
    tokenizer = AutoTokenizer.from_pretrained(target)
    prompts = [prompt_ids(item, tokenizer) for item in load_items("tiny", 8, split="test")]
    llm = make_llm(target, config, max_model_len=512, gpu_memory_utilization=0.3)
    greedy = SamplingParams(temperature=0.0, max_tokens=48)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], greedy, use_tqdm=False)  # warm-up

    _refuse_event_waits_when_strict()
    for owner, name in ((proposer.SpecGuardDraftProposer, "propose"),
                        (verifier.SpecGuardRejectionSampler, "forward"),
                        (grounding_capture.GroundingCapture, "on_attention"),
                        (runner_state.SpecGuardRunnerState, "record_committed"),
                        (runner_state.SpecGuardRunnerState, "truncate_drafts"),
                        (runner_state.SpecGuardRunnerState, "draft_rows"),
                        (runner_state.SpecGuardRunnerState, "arm_grounding")):
        setattr(owner, name, _strict(getattr(owner, name)))
    per_step: list[collections.Counter] = []
    sample_tokens = GPUModelRunner.sample_tokens

    @functools.wraps(sample_tokens)
    def counted(runner, *args, **kwargs):
        before = collections.Counter(host_transfer.HOST_READS)
        try:
            return sample_tokens(runner, *args, **kwargs)
        finally:
            per_step.append(host_transfer.HOST_READS - before)
    GPUModelRunner.sample_tokens = counted

    # A mixed batch: greedy, seeded sampling, a constraint the verifier must process.
    banned = tokenizer("=", add_special_tokens=False)["input_ids"]
    params = [greedy, SamplingParams(temperature=0.8, seed=7, max_tokens=48),
              SamplingParams(temperature=0.0, max_tokens=48, bad_words=["="] if banned else None),
              SamplingParams(temperature=0.0, max_tokens=48, extra_args={"beta": 1.0})] * 2
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    # vLLM 0.32 verifies, commits and drafts inside sample_tokens: one call per engine step.
    sites = sorted({site for step in per_step for site in step})
    print(json.dumps({"steps": len(per_step), "outputs": len(outputs),
                      "max_reads_per_step": {s: max(step[s] for step in per_step) for s in sites},
                      "total_reads": {s: sum(step[s] for step in per_step) for s in sites}}),
          flush=True)
    shutdown_llm(llm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
