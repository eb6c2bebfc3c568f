"""The step verifier: vLLM's rejection sampler with SpecGuard's whole-step rule.

For each request whose verification batch row carries a drafted step, vLLM's
token-level rejection is replaced by the step decision (SPECGUARD.md 2.3-2.5):
LPBV from the target logits of the step, ABGV from the grounding statistics
captured during the same forward, ``score >= tau`` per request. Accepted rows
commit ``[d_1..d_n, bonus]``; rejected rows commit only the target's own token
at the step's first position. Rows without drafts sample one token as usual.

With ``fallback: speculative`` (SPECGUARD.md 4) a row may carry a *tail* past the
step's end, and rows finishing a rejected step are verified token by token. All of
those go through vLLM's own rejection sampler in one call: rejected rows and finishing
rows on the real logits; accepted rows with a tail on logits whose step positions are
forced to the drafted token (so their step is kept and only the tail is judged
token-level, losslessly).
The output keeps vLLM's encoding (``-1`` padding), so the scheduler's
bookkeeping and its spec-decode counters need no change.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from vllm.v1.outputs import SamplerOutput
from vllm.v1.sample.rejection_sampler import (
    PLACEHOLDER_TOKEN_ID,
    RejectionSampler,
    apply_sampling_constraints,
)

from specguard_vllm.core.decision import StepDecision, decide_steps
from specguard_vllm.core.grounding import rollout_grounding_min
from specguard_vllm.kernels.dispatch import step_min_logprob
from specguard_vllm.plugin.step_state import StepMode, StepVerdicts, row_verdict

if TYPE_CHECKING:
    from specguard_vllm.plugin.runner_state import SpecGuardRunnerState


class SpecGuardRejectionSampler(RejectionSampler):
    """Reads the runner's SpecGuard state (modes, step lengths, grounding capture) and
    leaves this engine step's :class:`StepVerdicts` there for the step table."""

    def __init__(self, sampler, spec_config, device, *, state: SpecGuardRunnerState):
        super().__init__(sampler, spec_config, device)
        self.state = state
        self.specguard = state.config
        self.runner = state.runner
        self.metrics = state.metrics
        # Optional JSONL log of every verified step (for `specguard trace --engine vllm`
        # and the differential tests): request id, context length, drafted tokens, scores.
        self.decision_log = os.environ.get("SPECGUARD_DECISION_LOG") or None

    # ---------------------------------------------------------------- per request
    def _request_params(self, req_ids: list[str]):
        """tau and beta per row, with validated ``vllm_xargs`` overrides."""
        taus, betas, speculative = [], [], []
        for req_id in req_ids:
            params = self.state.request_params(req_id)
            taus.append(params.tau)
            betas.append(params.beta)
            speculative.append(params.fallback == "speculative")
        return taus, betas, speculative

    def _in_token_level_mode(self, req_ids: list[str]) -> list[bool]:
        return [self.state.steps.get(req_id).mode is StepMode.TOKEN_LEVEL for req_id in req_ids]

    def _step_lengths(self, req_ids: list[str], num_drafts: list[int]) -> list[int]:
        """Per row, how many of its drafted tokens form the step (the rest is a tail)."""
        lengths = []
        for i, n in enumerate(num_drafts):
            req_id = req_ids[i] if i < len(req_ids) else None
            step_len = None
            if n > 0 and req_id is not None:
                step_len = self.state.draft_step_lens.take(req_id)
            # The scheduler may have scheduled fewer drafts than were proposed.
            lengths.append(n if step_len is None else min(step_len, n))
        return lengths

    def _grounding(self, metadata, device, step_lens: list[int]) -> torch.Tensor | None:
        """G_min per row, one batched rollout for all requests (no per-request host sync)."""
        capture = self.state.capture
        if capture is None or not capture.complete_for(metadata.num_draft_tokens):
            return None
        batch = capture.batch
        n_max = max(step_lens, default=0)
        num_rows_t = sum(metadata.num_draft_tokens) if batch.prefix_mass else 0
        if n_max == 0 or num_rows_t == 0:
            g_min = torch.ones(len(step_lens), dtype=torch.float32, device=device)
        else:
            # Only this batch's rows: the capture's buffers are sized for the largest batch.
            masses = torch.stack([pm[:num_rows_t] for pm in batch.prefix_mass])  # [m, T]
            blocks = torch.stack([blk[:num_rows_t] for blk in batch.block])  # [m, T, K]
            src = masses.device
            # Rollout is causal: a step's positions never depend on the tail after it,
            # so only the first step_lens[i] rows and columns of request i are read.
            num_drafts = torch.tensor(metadata.num_draft_tokens, dtype=torch.int64)
            offsets = (torch.cumsum(num_drafts, 0) - num_drafts).to(src)  # [B]
            j = torch.arange(n_max, device=src)
            rows = (offsets.unsqueeze(1) + j).clamp(max=num_rows_t - 1)  # [B, n_max]
            cols = j.clamp(max=blocks.shape[2] - 1)
            pm = masses[:, rows].permute(1, 0, 2)  # [B, m, n_max]
            blk = blocks[:, rows.unsqueeze(-1), cols].permute(1, 0, 2, 3)  # [B, m, n_max, n_max]
            lengths = torch.tensor(step_lens, dtype=torch.int64).to(src)
            g_min = rollout_grounding_min(pm, blk, lengths).to(device)
        if self.metrics is not None:
            self.metrics.add_grounding_time(capture.seconds)
        capture.seconds = 0.0
        capture.clear()
        return g_min

    # ---------------------------------------------------------------- forward
    @staticmethod
    def _step_positions(num_drafts: list[int], step_lens: list[int], rows, device) -> torch.Tensor:
        """Indices into the flat draft-token arrays of the step positions of ``rows``."""
        starts = [0]
        for n in num_drafts[:-1]:
            starts.append(starts[-1] + n)
        flat = [starts[i] + j for i in rows for j in range(step_lens[i])]
        return torch.tensor(flat, dtype=torch.int64, device=device)

    def _step_min_logprob(self, metadata, logits, step_lens: list[int], device) -> torch.Tensor:
        """LPBV per row over its step's positions only, in one pass over the vocabulary
        (kernels.dispatch: fused Triton kernel on CUDA)."""
        n_list = metadata.num_draft_tokens
        rows = metadata.target_logits_indices
        token_ids = metadata.draft_token_ids
        if list(step_lens) != list(n_list):  # some rows carry a tail: keep step positions
            index = self._step_positions(list(n_list), step_lens, range(len(n_list)), device)
            rows, token_ids = rows[index], token_ids[index]
        lengths = torch.tensor(step_lens, dtype=torch.int64, device=device)
        cu = torch.zeros(len(step_lens) + 1, dtype=torch.int64, device=device)
        cu[1:] = torch.cumsum(lengths, 0)
        _, l_min = step_min_logprob(logits, token_ids, cu, max_step_len=max(max(step_lens), 1),
                                    rows=rows)
        return torch.where(lengths > 0, l_min, torch.zeros_like(l_min))

    def _forced_step_logits(self, logits, metadata, rows: list[int], step_lens: list[int]):
        """A copy of ``logits`` where the step positions of ``rows`` can only be their draft.

        vLLM's rejection sampler then keeps those steps with probability 1 (greedy or not)
        and judges only the tails after them, token by token.
        """
        index = self._step_positions(list(metadata.num_draft_tokens), step_lens, rows,
                                     logits.device)
        positions = metadata.target_logits_indices[index]
        tokens = metadata.draft_token_ids[index].to(torch.int64)
        forced = logits.clone()
        forced[positions] = float("-inf")
        forced[positions, tokens] = 0.0
        return forced

    def forward(self, metadata, draft_probs, logits, sampling_metadata) -> SamplerOutput:
        num_rows = len(metadata.num_draft_tokens)
        req_ids = list(self.runner.input_batch.req_ids[:num_rows])
        step_lens = self._step_lengths(req_ids, list(metadata.num_draft_tokens))
        g_min = self._grounding(metadata, logits.device, step_lens)
        if g_min is None:
            # Warm-up / profiling runs with dummy metadata: nothing was captured.
            self.state.verdicts = None
            return super().forward(metadata, draft_probs, logits, sampling_metadata)
        started = time.perf_counter()
        device = logits.device
        num_drafts = torch.tensor(metadata.num_draft_tokens, dtype=torch.int64, device=device)
        step_lens_t = torch.tensor(step_lens, dtype=torch.int64, device=device)
        has_step = num_drafts > 0
        l_min = self._step_min_logprob(metadata, logits, step_lens, device)

        taus, betas, speculative = self._request_params(req_ids)
        score, accepted = decide_steps(
            l_min, g_min, tau=torch.tensor(taus, device=device), beta=torch.tensor(betas, device=device),
            lpbv_floor=self.specguard.specguard.lpbv_floor)
        # Rows finishing a rejected step token-level are not judged as steps again.
        finishing = torch.tensor(self._in_token_level_mode(req_ids), dtype=torch.bool, device=device)
        finishing = finishing | (has_step & (step_lens_t == 0))
        accepted = accepted & has_step & ~finishing
        rejected = has_step & ~accepted & ~finishing
        token_level = has_step & (finishing | (rejected & torch.tensor(speculative, device=device)))
        rejected = rejected & ~token_level
        with_tail = accepted & (step_lens_t < num_drafts)

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
        tail_list = with_tail.tolist()
        token_rows = None
        if any(token_level_list) or any(tail_list):
            # vLLM's own token-level rejection sampling (lossless), one call for every row
            # that needs it; accepted steps with a tail get their step positions forced.
            stock_logits = logits
            if any(tail_list):
                stock_logits = self._forced_step_logits(
                    logits, metadata, [i for i, t in enumerate(tail_list) if t], step_lens)
            stock = super().forward(metadata, draft_probs, stock_logits,
                                    replace(sampling_metadata, max_num_logprobs=None))
            token_rows = stock.sampled_token_ids.to(torch.int32)
        draft_lists = metadata.draft_token_ids.tolist()
        accepted_list, n_list = accepted.tolist(), metadata.num_draft_tokens
        next_list = next_tokens.tolist()
        offset = 0
        for i in range(num_rows):
            n = n_list[i]
            if token_level_list[i] or tail_list[i]:
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
        self.state.verdicts = StepVerdicts(req_ids, [
            row_verdict(decisions[i], token_level_list[i], step_lens[i]) for i in range(num_rows)])
        if self.decision_log:
            self._log_decisions(req_ids, decisions, draft_lists, n_list, step_lens,
                                token_level_list, out)
        if self.metrics is not None:
            self.metrics.observe_verification(decisions, time.perf_counter() - started)
        return SamplerOutput(sampled_token_ids=out, logprobs_tensors=logprobs_tensors)

    def _log_decisions(self, req_ids, decisions, draft_lists, n_list, step_lens, token_level,
                       out) -> None:
        """One line per verified row: ``kind`` "step" (judged: scores and decision) or
        "token" (finishing a rejected step token-level); ``committed`` is how many tokens
        the row committed (kept drafts plus the target's own last token)."""
        context_lens = self.runner.input_batch.num_tokens_no_spec
        committed = (out != PLACEHOLDER_TOKEN_ID).sum(dim=1).tolist()
        lines, offset = [], 0
        for i, decision in enumerate(decisions):
            n = n_list[i]
            entry = {"req_id": req_ids[i], "context_len": int(context_lens[i]),
                     "drafted": draft_lists[offset: offset + n], "committed": int(committed[i])}
            if decision is not None:
                lines.append(json.dumps({
                    "kind": "step", **entry, "step_len": step_lens[i], "lpbv": decision.lpbv,
                    "abgv": decision.abgv, "score": decision.score, "accepted": decision.accepted}))
            elif n > 0 and token_level[i]:
                lines.append(json.dumps({"kind": "token", **entry}))
            offset += n
        if lines:
            with open(self.decision_log, "a", encoding="utf-8") as log:
                log.write("\n".join(lines) + "\n")
