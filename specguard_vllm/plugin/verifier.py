"""The step verifier: vLLM's rejection sampler with SpecGuard's whole-step rule.

For each request whose verification batch row carries a drafted step, vLLM's
token-level rejection is replaced by the step decision (SPECGUARD.md 2.3-2.5):
LPBV from the target logits of the step, ABGV from the grounding statistics
captured during the same forward, ``score >= tau`` per request. Accepted rows
commit ``[d_1..d_n, bonus]``; rejected rows commit only the target's own token
at the step's first position. Rows without drafts sample one token as usual.
The output keeps vLLM's encoding (``-1`` padding), so the scheduler's
bookkeeping and its spec-decode counters need no change.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace

import torch
from vllm.v1.outputs import SamplerOutput
from vllm.v1.sample.rejection_sampler import (
    PLACEHOLDER_TOKEN_ID,
    RejectionSampler,
    apply_sampling_constraints,
)

from specguard_vllm.config import ConfigError, SpecGuardConfig, apply_request_overrides
from kernels.dispatch import step_min_logprob
from specguard_vllm.core.decision import StepDecision, decide_steps
from specguard_vllm.core.grounding import rollout_grounding
from specguard_vllm.plugin import grounding_capture


@dataclass
class StepVerdicts:
    """What the last verification decided, row by row (None: no step drafted)."""

    req_ids: list[str]
    decisions: list[StepDecision | None]
    draft_lengths: list[int]
    token_level: list[bool]  # rows verified token by token (fallback: speculative)

    def verdict(self, i: int):
        if self.token_level[i]:
            return "token"
        decision = self.decisions[i]
        return None if decision is None else decision.accepted


class SpecGuardRejectionSampler(RejectionSampler):
    def __init__(self, sampler, spec_config, device, *, specguard: SpecGuardConfig, runner, metrics):
        super().__init__(sampler, spec_config, device)
        self.specguard = specguard
        self.runner = runner
        self.metrics = metrics
        self.last_verdicts: StepVerdicts | None = None
        # Optional JSONL log of every verified step (for `specguard trace --engine vllm`
        # and the differential tests): request id, context length, drafted tokens, scores.
        self.decision_log = os.environ.get("SPECGUARD_DECISION_LOG") or None

    # ---------------------------------------------------------------- per request
    def _request_params(self, num_rows: int):
        """tau and beta per row, with validated ``vllm_xargs`` overrides."""
        base = self.specguard.specguard
        taus, betas, speculative = [], [], []
        req_ids = self.runner.input_batch.req_ids[:num_rows]
        for req_id in req_ids:
            params = base
            request = self.runner.requests.get(req_id)
            extra = getattr(getattr(request, "sampling_params", None), "extra_args", None)
            if extra:
                try:
                    params = apply_request_overrides(base, extra)
                except ConfigError:
                    params = base  # refused at the API server already; never reached there
            taus.append(params.tau)
            betas.append(params.beta)
            speculative.append(params.fallback == "speculative")
        return list(req_ids), taus, betas, speculative

    def _in_token_level_mode(self, req_ids: list[str]) -> list[bool]:
        state = getattr(self.runner, "_specguard", None)
        if state is None:
            return [False] * len(req_ids)
        return [state.steps.get(req_id).token_level for req_id in req_ids]

    def _grounding(self, metadata, device) -> torch.Tensor | None:
        capture = grounding_capture.ACTIVE
        if capture is None or not capture.complete_for(metadata.num_draft_tokens):
            return None
        batch = capture.batch
        g_min = []
        offset = 0
        for n in metadata.num_draft_tokens:
            if n == 0:
                g_min.append(1.0)
                continue
            masses = torch.stack([pm[offset: offset + n] for pm in batch.prefix_mass])
            blocks = torch.stack([blk[offset: offset + n, :n] for blk in batch.block])
            g_min.append(float(rollout_grounding(masses.float(), blocks.float()).min()))
            offset += n
        if self.metrics is not None:
            self.metrics.add_grounding_time(capture.seconds)
        capture.seconds = 0.0
        capture.clear()
        return torch.tensor(g_min, dtype=torch.float32, device=device)

    # ---------------------------------------------------------------- forward
    def forward(self, metadata, draft_probs, logits, sampling_metadata) -> SamplerOutput:
        num_rows = len(metadata.num_draft_tokens)
        g_min = self._grounding(metadata, logits.device)
        if g_min is None:
            # Warm-up / profiling runs with dummy metadata: nothing was captured.
            self.last_verdicts = None
            return super().forward(metadata, draft_probs, logits, sampling_metadata)
        started = time.perf_counter()
        device = logits.device
        num_drafts = torch.tensor(metadata.num_draft_tokens, dtype=torch.int64, device=device)
        has_step = num_drafts > 0
        # LPBV per row from the raw target logits of the drafted positions, in one pass
        # over the vocabulary (kernels.dispatch: fused Triton kernel on CUDA).
        cu = torch.zeros(num_rows + 1, dtype=torch.int64, device=device)
        cu[1:] = metadata.cu_num_draft_tokens.to(device=device, dtype=torch.int64)
        _, l_min = step_min_logprob(logits, metadata.draft_token_ids, cu,
                                    max_step_len=metadata.max_spec_len,
                                    rows=metadata.target_logits_indices)
        l_min = torch.where(has_step, l_min, torch.zeros_like(l_min))

        req_ids, taus, betas, speculative = self._request_params(num_rows)
        score, accepted = decide_steps(
            l_min, g_min, tau=torch.tensor(taus, device=device), beta=torch.tensor(betas, device=device),
            lpbv_floor=self.specguard.specguard.lpbv_floor)
        # Rows finishing a rejected step token-level are not judged as steps again.
        finishing = torch.tensor(self._in_token_level_mode(req_ids), dtype=torch.bool, device=device)
        accepted = accepted & has_step & ~finishing
        rejected = has_step & ~accepted & ~finishing
        token_level = has_step & (finishing | (rejected & torch.tensor(speculative, device=device)))
        rejected = rejected & ~token_level

        # Tokens: the bonus row for accepted / draft-less rows, the step's first
        # position for rejected rows (the target's own token there).
        no_logprobs = replace(sampling_metadata, max_num_logprobs=-1)
        mode = "processed_logits" if self.is_processed_logprobs_mode else "raw_logits"
        bonus_out = self.sampler(logits=logits[metadata.bonus_logits_indices],
                                 sampling_metadata=no_logprobs, predict_bonus_token=True,
                                 logprobs_mode_override=mode)
        next_tokens = bonus_out.sampled_token_ids[:, 0].clone()
        if bool(rejected.any()):
            starts = metadata.cu_num_sampled_tokens.to(device, torch.int64) - (num_drafts + 1)
            first_out = self.sampler(logits=logits[starts], sampling_metadata=no_logprobs,
                                     predict_bonus_token=False, logprobs_mode_override=mode)
            next_tokens = torch.where(rejected, first_out.sampled_token_ids[:, 0], next_tokens)

        width = metadata.max_spec_len + 1
        out = torch.full((num_rows, width), PLACEHOLDER_TOKEN_ID, dtype=torch.int32, device=device)
        token_level_list = token_level.tolist()
        token_rows = None
        if any(token_level_list):
            # vLLM's own token-level rejection sampling (lossless for the greedy target).
            stock = super().forward(metadata, draft_probs, logits,
                                    replace(sampling_metadata, max_num_logprobs=None))
            token_rows = stock.sampled_token_ids.to(torch.int32)
        draft_lists = metadata.draft_token_ids.tolist()
        accepted_list, n_list = accepted.tolist(), metadata.num_draft_tokens
        next_list = next_tokens.tolist()
        offset = 0
        for i in range(num_rows):
            n = n_list[i]
            if token_level_list[i]:
                out[i, : token_rows.shape[1]] = token_rows[i]
            elif accepted_list[i]:
                out[i, :n] = torch.tensor(draft_lists[offset: offset + n], dtype=torch.int32)
                out[i, n] = next_list[i]
            else:
                out[i, 0] = next_list[i]
            offset += n

        logprobs_tensors = None
        if sampling_metadata.max_num_logprobs is not None:
            raw_target_logits = logits[metadata.target_logits_indices].to(torch.float32)
            target_for_logprobs = raw_target_logits
            if self.is_processed_logprobs_mode:
                target_for_logprobs = apply_sampling_constraints(
                    self.apply_logits_processors(raw_target_logits.clone(), sampling_metadata, metadata),
                    metadata.cu_num_draft_tokens, sampling_metadata)
            logprobs_tensors = self._get_logprobs_tensors(
                sampling_metadata.max_num_logprobs, metadata, logits, target_for_logprobs,
                bonus_out.logprobs_tensors.logprobs, out)

        decisions: list[StepDecision | None] = []
        l_list, g_list, s_list = l_min.tolist(), g_min.tolist(), score.tolist()
        finishing_list = finishing.tolist()
        for i in range(num_rows):
            judged = n_list[i] > 0 and not finishing_list[i]
            decisions.append(StepDecision(l_list[i], g_list[i], s_list[i], bool(accepted_list[i]))
                             if judged else None)
        self.last_verdicts = StepVerdicts(req_ids, decisions, list(n_list), token_level_list)
        if self.decision_log:
            self._log_decisions(req_ids, decisions, draft_lists, n_list)
        if self.metrics is not None:
            self.metrics.observe_verification(decisions, time.perf_counter() - started)
        return SamplerOutput(sampled_token_ids=out, logprobs_tensors=logprobs_tensors)

    def _log_decisions(self, req_ids, decisions, draft_lists, n_list) -> None:
        context_lens = self.runner.input_batch.num_tokens_no_spec
        lines, offset = [], 0
        for i, decision in enumerate(decisions):
            n = n_list[i]
            if decision is not None:
                lines.append(json.dumps({
                    "req_id": req_ids[i], "context_len": int(context_lens[i]),
                    "drafted": draft_lists[offset: offset + n], "lpbv": decision.lpbv,
                    "abgv": decision.abgv, "score": decision.score, "accepted": decision.accepted}))
            offset += n
        if lines:
            with open(self.decision_log, "a", encoding="utf-8") as log:
                log.write("\n".join(lines) + "\n")
