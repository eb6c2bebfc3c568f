"""What SpecGuard adds to vLLM's V1 model runner, as plain functions.

`patches.py` wraps the runner's methods with these; each does its SpecGuard
work only when the runner carries a :class:`SpecGuardRunnerState` (that is,
when the engine's speculative config asked for SpecGuard).
"""

from __future__ import annotations

import logging

import torch

from specguard_vllm.config import SpecGuardConfig
from specguard_vllm.core.steps import StepSegmenter
from specguard_vllm.plugin import grounding_capture
from specguard_vllm.plugin.config_bridge import specguard_from_additional_config
from specguard_vllm.plugin.request_params import request_params
from specguard_vllm.plugin.step_state import StepStateTable

logger = logging.getLogger("vllm.specguard")

SUPPORTED_BACKENDS = ("CPU_ATTN", "FLASH_ATTN", "TRITON_ATTN")


class SpecGuardRunnerState:
    """Everything SpecGuard keeps on one model runner."""

    def __init__(self, runner, config: SpecGuardConfig):
        from vllm.tokenizers.registry import get_tokenizer

        from specguard_vllm.plugin.metrics import get_metrics
        from specguard_vllm.plugin.proposer import SpecGuardDraftProposer
        from specguard_vllm.plugin.verifier import SpecGuardRejectionSampler

        self.config = config
        model_config = runner.model_config
        tokenizer = get_tokenizer(model_config.tokenizer,
                                  trust_remote_code=model_config.trust_remote_code)
        vocab_size = model_config.get_vocab_size()
        self.segmenter = StepSegmenter.from_tokenizer(
            tokenizer, config.specguard.step_delimiters, vocab_size=vocab_size)
        self.steps = StepStateTable(self.segmenter)
        self.metrics = get_metrics(model_config.served_model_name
                                   if isinstance(model_config.served_model_name, str)
                                   else str(model_config.model))
        if not isinstance(runner.drafter, SpecGuardDraftProposer):
            raise RuntimeError("SpecGuard: the draft proposer was not replaced; is the plugin "
                               "registered before the model runner is built?")
        runner.drafter.metrics = self.metrics
        runner.drafter.step_length_fn = lambda ids, prefix: self.segmenter.step_length(ids, prefix=prefix)
        runner.rejection_sampler = SpecGuardRejectionSampler(
            runner.sampler, runner.speculative_config, runner.device,
            specguard=config, runner=runner, metrics=self.metrics)
        self.capture: grounding_capture.GroundingCapture | None = None
        logger.info("SpecGuard active: k=%d, tau=%.3f, beta=%.3f, %d grounding layers, delimiters=%r",
                    config.specguard.num_candidates, config.specguard.tau, config.specguard.beta,
                    config.specguard.grounding_layers, config.specguard.step_delimiters)

    def ensure_capture(self, runner) -> grounding_capture.GroundingCapture:
        if self.capture is None:
            context = runner.compilation_config.static_forward_context
            positions = grounding_capture.grounding_layer_names(
                context.keys(), self.config.specguard.grounding_layers)
            first = context[next(iter(positions))]
            backend = first.attn_backend.get_name()
            if backend not in SUPPORTED_BACKENDS:
                raise RuntimeError(
                    f"SpecGuard grounding reads the paged K cache of backends {SUPPORTED_BACKENDS}; "
                    f"this engine uses {backend}. Choose one with --attention-backend.")
            self.capture = grounding_capture.GroundingCapture(
                positions, self.config.specguard.attention_sparsity, backend)
            grounding_capture.ACTIVE = self.capture
            logger.info("SpecGuard grounding layers (%s): %s", backend, sorted(positions, key=positions.get))
        return self.capture


def state_of(runner) -> SpecGuardRunnerState | None:
    return getattr(runner, "_specguard", None)


# ---------------------------------------------------------------------- hooks

def after_runner_init(runner) -> None:
    spec = getattr(runner, "speculative_config", None)
    if spec is None:
        return
    config = specguard_from_additional_config(runner.vllm_config.additional_config)
    if config is None:
        return
    runner._specguard = SpecGuardRunnerState(runner, config)


def before_execute_model(runner) -> None:
    state = state_of(runner)
    if state is None:
        return
    if state.capture is not None:
        state.capture.clear()
    runner.rejection_sampler.last_verdicts = None


def after_execute_model(runner) -> None:
    state = state_of(runner)
    if state is not None and state.capture is not None:
        state.capture.disarm()


def on_spec_decode_metadata(runner, metadata) -> None:
    state = state_of(runner)
    if state is None:
        return
    state.ensure_capture(runner).arm(list(metadata.num_draft_tokens))


def after_sampling(runner, output_token_ids: torch.Tensor) -> None:
    """Update each request's step state from what this engine step committed."""
    state = state_of(runner)
    if state is None:
        return
    num_reqs = runner.input_batch.num_reqs
    req_ids = runner.input_batch.req_ids[:num_reqs]
    discarded = runner.discard_request_mask.np[:num_reqs]
    rows = output_token_ids[:num_reqs].tolist()
    verdicts = runner.rejection_sampler.last_verdicts
    vocab = runner.input_batch.vocab_size
    for i, req_id in enumerate(req_ids):
        if bool(discarded[i]):
            continue
        tokens = [t for t in rows[i] if 0 <= t < vocab]
        verified, step_len = None, None
        if verdicts is not None and i < len(verdicts.decisions) and verdicts.req_ids[i] == req_id:
            verified, step_len = verdicts.verdict(i), verdicts.step_lens[i]
        state.steps.after_sampling(req_id, tokens, verified, step_len)
    state.metrics.set_tracked(len(state.steps))


def before_propose(runner) -> None:
    state = state_of(runner)
    if state is None:
        return
    num_reqs = runner.input_batch.num_reqs
    hints = []
    base = state.config.specguard
    for req_id in runner.input_batch.req_ids[:num_reqs]:
        request_state = state.steps.get(req_id)
        full_row = request_params(runner, req_id, base).fallback == "speculative"
        hints.append((list(request_state.open_step), request_state.regenerating, full_row))
    runner.drafter.row_hints = hints


def truncate_drafts(runner, drafts):
    """Cut each proposed row after its step delimiter; no drafts while regenerating.

    Requests with ``fallback: speculative`` keep the draft past the step's end: the
    verifier judges the step and verifies the tail token-level (SPECGUARD.md section 4).
    """
    state = state_of(runner)
    if state is None or not isinstance(drafts, torch.Tensor):
        return drafts
    num_reqs = drafts.shape[0]
    req_ids = runner.input_batch.req_ids[:num_reqs]
    rows = drafts.tolist()
    base = state.config.specguard
    return [state.steps.truncate_draft(
        req_id, row, keep_tail=request_params(runner, req_id, base).fallback == "speculative")
        for req_id, row in zip(req_ids, rows)]


def on_update_states(runner, scheduler_output) -> None:
    state = state_of(runner)
    if state is None:
        return
    finished = getattr(scheduler_output, "finished_req_ids", None) or ()
    state.steps.forget(finished)
    runner.drafter.forget(finished)
    state.metrics.set_tracked(len(state.steps))


def grounding_hook(impl, layer, query, kv_cache, attn_metadata, key=None) -> None:
    capture = grounding_capture.ACTIVE
    if capture is None or not capture.armed:
        return
    name = getattr(layer, "layer_name", None)
    if name is None or name not in capture.layer_positions:
        return
    capture.on_attention(name, impl, query, kv_cache, attn_metadata, key=key, layer=layer)
