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

Request constraints (SPECGUARD.md 2.6) hold for every committed token: a draft that the
request's *processed* distribution forbids (probability 0 after everything vLLM applies to
the target's logits, with the preceding drafts as context: grammar bitmask,
allowed_token_ids, bad_words, min_tokens, thinking budget, top-k/top-p) is never committed.
An accepted step is cut just before its first forbidden token; the step is its drafts up to
there, and vLLM's sampler, with those positions forced, rejects the forbidden draft and
samples the target's own token from the processed distribution in its place. A row the
scheduler truncated (fewer drafts scheduled than the proposed step: token budget,
``max_model_len``, grammar validation) is not judged as if whole: it is verified
token-level, losslessly, and its step stays open.
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
from vllm.v1.sample.logits_processor.builtin import MinTokensLogitsProcessor
from vllm.v1.sample.rejection_sampler import (
    PLACEHOLDER_TOKEN_ID,
    RejectionSampler,
    apply_sampling_constraints,
)

from specguard_vllm.core.decision import StepDecision, decide_steps
from specguard_vllm.core.grounding import ragged_step_stats, rollout_grounding_min
from specguard_vllm.kernels.dispatch import step_min_logprob
from specguard_vllm.plugin.grounding_capture import tensor_parallel_rank_and_size
from specguard_vllm.plugin.host_transfer import read_to_host, rows_to_device
from specguard_vllm.plugin.step_state import StepMode, StepVerdicts, row_verdict

if TYPE_CHECKING:
    from specguard_vllm.plugin.runner_state import SpecGuardRunnerState


def _layer_statistics(capture, num_rows_t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prefix_mass [m, T], block [m, T, K])`` of this forward's T step rows, per layer.

    TP=1: the layers' fused statistics (only this batch's rows: the buffers are sized for
    the largest batch). TP>1: every layer's head-average shares summed over the TP group in
    one all_reduce, then thresholded as the fused path does; called on every rank whenever
    rows were captured, so the ranks always meet in the collective.
    """
    tp = capture.tensor_parallel
    if tp is None:
        batch = capture.batch
        return (torch.stack([pm[:num_rows_t] for pm in batch.prefix_mass]),
                torch.stack([blk[:num_rows_t] for blk in batch.block]))
    from vllm.distributed import get_tp_group

    averages = get_tp_group().all_reduce(tp.rows)  # [m, T, keys]: heads of every rank
    return ragged_step_stats(averages, tp.prefix_lens, tp.step_index, capture.sparsity,
                             tp.max_step_len)


class SpecGuardRejectionSampler(RejectionSampler):
    """Reads the runner's SpecGuard state (modes, step lengths, grounding capture) and
    leaves this engine step's :class:`StepVerdicts` there for the step table."""

    def __init__(self, sampler, spec_config, device, *, state: SpecGuardRunnerState):
        super().__init__(sampler, spec_config, device)
        self.state = state
        self.specguard = state.config
        self.runner = state.runner
        # Every TP rank decides alike; rank 0 alone counts, so /metrics counts each step once.
        rank, _ = tensor_parallel_rank_and_size()
        self.metrics = state.metrics if rank == 0 else None
        # Optional JSONL log of every verified step (for `specguard trace --engine vllm`
        # and the differential tests): request id, context length, drafted tokens, scores.
        # TP rank r > 0 writes ``<log>.tp<r>``, so the ranks' decisions can be compared.
        self.decision_log = os.environ.get("SPECGUARD_DECISION_LOG") or None
        if self.decision_log and rank > 0:
            self.decision_log = f"{self.decision_log}.tp{rank}"

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

    def _step_lengths(self, req_ids: list[str], num_drafts: list[int]) -> tuple[list[int], list[int]]:
        """Per row, how many of its scheduled drafts form the step (the rest is a tail), and
        how long the proposed step was: longer than the row when the scheduler truncated it
        (token budget, ``max_model_len``, grammar validation)."""
        lengths, proposed = [], []
        for i, n in enumerate(num_drafts):
            req_id = req_ids[i] if i < len(req_ids) else None
            step_len = None
            if n > 0 and req_id is not None:
                step_len = self.state.draft_step_lens.take(req_id)
            step_len = n if step_len is None else step_len
            lengths.append(min(step_len, n))
            proposed.append(step_len)
        return lengths, proposed

    def _grounding(self, metadata, device, step_lens: list[int], num_drafts_t: torch.Tensor,
                   step_lens_t: torch.Tensor) -> torch.Tensor | None:
        """G_min per row, one batched rollout for all requests (no per-request host sync)."""
        capture = self.state.capture
        if capture is None or not capture.complete_for(metadata.num_draft_tokens):
            return None
        n_max = max(step_lens, default=0)
        num_rows_t = sum(metadata.num_draft_tokens) if capture.batch.prefix_mass else 0
        stats = _layer_statistics(capture, num_rows_t) if num_rows_t else None
        if n_max == 0 or stats is None:
            g_min = torch.ones(len(step_lens), dtype=torch.float32, device=device)
        else:
            masses, blocks = stats  # [m, T], [m, T, K]
            src = masses.device
            # Rollout is causal: a step's positions never depend on the tail after it,
            # so only the first step_lens[i] rows and columns of request i are read.
            num_drafts = num_drafts_t.to(src)
            offsets = torch.cumsum(num_drafts, 0) - num_drafts  # [B]
            j = torch.arange(n_max, device=src)
            rows = (offsets.unsqueeze(1) + j).clamp(max=num_rows_t - 1)  # [B, n_max]
            cols = j.clamp(max=blocks.shape[2] - 1)
            pm = masses[:, rows].permute(1, 0, 2)  # [B, m, n_max]
            blk = blocks[:, rows.unsqueeze(-1), cols].permute(1, 0, 2, 3)  # [B, m, n_max, n_max]
            g_min = rollout_grounding_min(pm, blk, step_lens_t.to(src)).to(device)
        if self.metrics is not None:
            self.metrics.add_grounding_time(capture.seconds)
        capture.seconds = 0.0
        capture.clear()
        return g_min

    # ---------------------------------------------------------------- forward
    @staticmethod
    def _prefix_positions(num_drafts: torch.Tensor, lengths: torch.Tensor, total: int) -> torch.Tensor:
        """Indices into the flat draft-token arrays of the first ``lengths[i]`` positions of
        each row ``i`` (``total``: their sum, known on the host), in tensor ops on the
        device: no loop over requests, no sync."""
        shift = (torch.cumsum(num_drafts, 0) - num_drafts) - (torch.cumsum(lengths, 0) - lengths)
        return (torch.repeat_interleave(shift, lengths, output_size=total)
                + torch.arange(total, device=num_drafts.device))

    def _step_min_logprob(self, metadata, logits, step_lens: list[int], num_drafts: torch.Tensor,
                          lengths: torch.Tensor) -> torch.Tensor:
        """LPBV per row over its step's positions only, in one pass over the vocabulary
        (kernels.dispatch: fused Triton kernel on CUDA)."""
        n_list = metadata.num_draft_tokens
        rows = metadata.target_logits_indices
        token_ids = metadata.draft_token_ids
        device = logits.device
        if list(step_lens) != list(n_list):  # some rows carry a tail: keep step positions
            index = self._prefix_positions(num_drafts, lengths, sum(step_lens))
            rows, token_ids = rows[index], token_ids[index]
        cu = torch.zeros(len(step_lens) + 1, dtype=torch.int64, device=device)
        cu[1:] = torch.cumsum(lengths, 0)
        _, l_min = step_min_logprob(logits, token_ids, cu, max_step_len=max(max(step_lens), 1),
                                    rows=rows)
        return torch.where(lengths > 0, l_min, torch.zeros_like(l_min))

    @staticmethod
    def _may_forbid(sampling_metadata) -> bool:
        """Whether any request of the batch has a constraint that can give a token probability 0
        besides the grammar bitmask (already in the logits): the cheap test that spares the
        vocabulary-wide processing otherwise."""
        sm = sampling_metadata
        if sm.allowed_token_ids_mask is not None or sm.bad_words_token_ids:
            return True
        if not sm.all_greedy and (sm.top_k is not None or sm.top_p is not None):
            return True
        if any(isinstance(p, MinTokensLogitsProcessor) and p.min_toks
               for p in sm.logitsprocs.non_argmax_invariant):
            return True
        holder = sm.thinking_budget_state_holder
        return holder is not None and holder.has_tracked_requests()

    def _first_forbidden(self, metadata, logits, sampling_metadata, num_drafts: torch.Tensor,
                         step_lens: torch.Tensor) -> torch.Tensor:
        """Per row, the first step position whose draft the request's processed distribution
        forbids (probability 0), else the step's length: where an accepted step is cut.

        "Processed" is what vLLM's own token-level verification applies to the target's logits,
        with the preceding drafts as context (``apply_logits_processors``: allowed_token_ids,
        bad_words, min_tokens, the thinking budget; ``apply_sampling_constraints``: top-k/top-p
        of sampled requests), on top of the grammar bitmask the runner already wrote into
        ``logits``. One batched pass over this batch's draft positions; ``logits`` is not changed.
        """
        drafts = metadata.draft_token_ids.to(torch.int64)
        if drafts.numel() == 0:  # vLLM builds spec-decode metadata for draft-less batches too
            return step_lens
        target_rows = metadata.target_logits_indices
        if self._may_forbid(sampling_metadata):
            # Indexing copies the draft rows, so the processors may work in place.
            processed = self.apply_logits_processors(
                logits[target_rows].to(torch.float32), sampling_metadata, metadata)
            processed = apply_sampling_constraints(
                processed, metadata.cu_num_draft_tokens, sampling_metadata)
            chosen = processed.gather(1, drafts.unsqueeze(1)).squeeze(1)
        else:
            chosen = logits[target_rows, drafts]
        forbidden = torch.isneginf(chosen)  # [T]
        row, within = self._draft_rows(num_drafts, drafts.shape[0])
        row_step_len = step_lens[row]
        at = torch.where(forbidden & (within < row_step_len), within, row_step_len)
        return step_lens.scatter_reduce(0, row, at, reduce="amin", include_self=True)

    @staticmethod
    def _draft_rows(num_drafts: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For each flat draft token: its row and its position within the row (tensor ops)."""
        device = num_drafts.device
        row = torch.repeat_interleave(torch.arange(num_drafts.shape[0], device=device), num_drafts,
                                      output_size=num_tokens)
        within = torch.arange(num_tokens, device=device) - (torch.cumsum(num_drafts, 0) - num_drafts)[row]
        return row, within

    @staticmethod
    def _assemble(metadata, num_drafts: torch.Tensor, accepted: torch.Tensor,
                  from_token_rows: torch.Tensor, next_tokens: torch.Tensor,
                  token_rows: torch.Tensor | None) -> torch.Tensor:
        """The sampler's output ``[B, max_spec_len + 1]`` in tensor ops (no loop over rows):
        an accepted step's drafts then the target's token; a rejected step or a draft-less
        row, the target's token alone; rows verified token-level, vLLM's own result."""
        device = num_drafts.device
        num_rows = num_drafts.shape[0]
        width = metadata.max_spec_len + 1
        drafts = metadata.draft_token_ids.to(device=device, dtype=torch.int32)
        out = torch.full((num_rows, width), PLACEHOLDER_TOKEN_ID, dtype=torch.int32, device=device)
        plain_accept = accepted & ~from_token_rows
        if drafts.numel():
            row, within = SpecGuardRejectionSampler._draft_rows(num_drafts, drafts.shape[0])
            kept = plain_accept[row]
            out[row[kept], within[kept]] = drafts[kept]
        next_col = torch.where(plain_accept, num_drafts, torch.zeros_like(num_drafts))
        out[torch.arange(num_rows, device=device), next_col] = next_tokens.to(torch.int32)
        if token_rows is not None:
            out = torch.where(from_token_rows.unsqueeze(1), token_rows[:, :width].to(torch.int32), out)
        return out

    def _token_level_rows(self, metadata, draft_probs, logits, sampling_metadata,
                          num_drafts: torch.Tensor, forced_lens: torch.Tensor,
                          num_forced: int) -> torch.Tensor:
        """vLLM's own token-level rejection sampling (lossless) of every row, with the first
        ``forced_lens[i]`` positions of row ``i`` (``num_forced`` in all) forced to their drafts, so they are kept with
        probability 1 (greedy or not) and the row is judged token-level from there: after an
        accepted step (its tail), or at a forbidden token that cuts it. A forced position is never
        a forbidden one (its row would be all -inf). The forced rows are written into ``logits``
        and restored afterwards: only they are copied."""
        positions = saved = None
        if num_forced:
            index = self._prefix_positions(num_drafts, forced_lens, num_forced)
            positions = metadata.target_logits_indices[index]
            tokens = metadata.draft_token_ids[index].to(torch.int64)
            saved = logits[positions]
            logits[positions] = float("-inf")
            logits[positions, tokens] = 0.0
        try:
            stock = super().forward(metadata, draft_probs, logits,
                                    replace(sampling_metadata, max_num_logprobs=None))
        finally:
            if positions is not None:
                logits[positions] = saved
        return stock.sampled_token_ids.to(torch.int32)

    def forward(self, metadata, draft_probs, logits, sampling_metadata) -> SamplerOutput:
        num_rows = len(metadata.num_draft_tokens)
        req_ids = list(self.runner.input_batch.req_ids[:num_rows])
        n_list = list(metadata.num_draft_tokens)
        step_lens, proposed = self._step_lengths(req_ids, n_list)
        device = logits.device
        # Every per-row host fact the decision needs, in one non-blocking copy (float64 holds
        # the ints exactly; tau/beta round to float32 as a direct conversion would).
        taus, betas, speculative = self._request_params(req_ids)
        knobs = rows_to_device([n_list, step_lens, proposed, speculative,
                                self._in_token_level_mode(req_ids), taus, betas],
                               torch.float64, device)
        num_drafts, step_lens_t, proposed_t, speculative_t, in_token_mode = knobs[:5].to(torch.int64)
        tau_t, beta_t = knobs[5:].to(torch.float32)
        skipped = self.state.grounding_skipped
        if skipped:  # beta = 1 on every drafted row: the score never reads G
            g_min = torch.ones(num_rows, dtype=torch.float32, device=device)
        else:
            g_min = self._grounding(metadata, device, step_lens, num_drafts, step_lens_t)
        if g_min is None:
            # Warm-up / profiling runs with dummy metadata: nothing was captured.
            self.state.verdicts = None
            return super().forward(metadata, draft_probs, logits, sampling_metadata)
        started = time.perf_counter()
        has_step = num_drafts > 0
        l_min = self._step_min_logprob(metadata, logits, step_lens, num_drafts, step_lens_t)
        cut = self._first_forbidden(metadata, logits, sampling_metadata, num_drafts, step_lens_t)

        score, accepted = decide_steps(l_min, g_min, tau=tau_t, beta=beta_t,
                                       lpbv_floor=self.specguard.specguard.lpbv_floor)
        # Rows finishing a rejected step token-level are not judged as steps again, nor are
        # steps the scheduler truncated (fewer drafts scheduled than the step has): those are
        # verified token-level and the step stays open.
        finishing = (in_token_mode != 0) | (has_step & (step_lens_t == 0))
        truncated = has_step & ~finishing & (proposed_t > num_drafts)
        judged = has_step & ~finishing & ~truncated
        accepted = accepted & judged
        rejected = judged & ~accepted
        token_level = has_step & (finishing | truncated | (rejected & (speculative_t != 0)))
        rejected = rejected & ~token_level
        # Accepted rows with a tail, or with a forbidden token in the step, keep their step up
        # to ``cut`` and are verified token-level from there.
        forced = accepted & (cut < num_drafts)
        # The step's one host transfer: every per-row outcome, the cut and the scores (float64
        # holds the int flags, the cut and the float32 scores exactly).
        host = read_to_host(torch.stack([v.to(torch.float64) for v in (
            accepted, rejected, token_level, truncated, forced, judged, cut, l_min, g_min, score)]),
            "verify_results")
        accepted_list, rejected_list, token_level_list, truncated_list, forced_list, judged_list = (
            [v != 0.0 for v in row] for row in host[:6])
        cut_list = [int(v) for v in host[6]]
        l_list, g_list, s_list = host[7:]

        # Tokens: the bonus row for accepted / draft-less rows, the step's first
        # position for rejected rows (the target's own token there).
        no_logprobs = replace(sampling_metadata, max_num_logprobs=-1)
        mode = "processed_logits" if self.is_processed_logprobs_mode else "raw_logits"
        bonus_out = self.sampler(logits=logits[metadata.bonus_logits_indices],
                                 sampling_metadata=no_logprobs, predict_bonus_token=True,
                                 logprobs_mode_override=mode)
        next_tokens = bonus_out.sampled_token_ids[:, 0].clone()
        if any(rejected_list):
            starts = metadata.cu_num_sampled_tokens.to(device, torch.int64) - (num_drafts + 1)
            first_out = self.sampler(logits=logits[starts], sampling_metadata=no_logprobs,
                                     predict_bonus_token=False, logprobs_mode_override=mode)
            next_tokens = torch.where(rejected, first_out.sampled_token_ids[:, 0], next_tokens)

        token_rows = None
        if any(token_level_list) or any(forced_list):
            # One call of vLLM's own sampler for every row that needs it.
            token_rows = self._token_level_rows(
                metadata, draft_probs, logits, sampling_metadata, num_drafts,
                torch.where(forced, cut, torch.zeros_like(cut)),
                sum(c for c, f in zip(cut_list, forced_list) if f))
        out = self._assemble(metadata, num_drafts, accepted, token_level | forced, next_tokens,
                             token_rows)

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
        for i in range(num_rows):
            decisions.append(StepDecision(l_list[i], None if skipped else g_list[i], s_list[i],
                                          bool(accepted_list[i])) if judged_list[i] else None)
        # An accepted step's committed part ends at its cut; a truncated row is no step
        # verdict (its tokens extend the open step, which keeps its mode).
        self.state.verdicts = StepVerdicts(req_ids, [
            row_verdict(decisions[i], token_level_list[i] and not truncated_list[i], cut_list[i])
            for i in range(num_rows)])
        if self.decision_log:
            self._log_decisions(req_ids, decisions, metadata.draft_token_ids.tolist(), n_list, step_lens, cut_list,
                                token_level_list, proposed, truncated_list, out)
        if self.metrics is not None:
            self.metrics.observe_verification(decisions, time.perf_counter() - started)
        return SamplerOutput(sampled_token_ids=out, logprobs_tensors=logprobs_tensors)

    def _log_decisions(self, req_ids, decisions, draft_lists, n_list, step_lens, cut, token_level,
                       proposed, truncated, out) -> None:
        """One line per verified row: ``kind`` "step" (judged: scores, decision, and for an
        accepted step ``committed_step``, its drafts committed before a forbidden token cut it)
        or "token" (verified token-level: finishing a rejected step, or a step the scheduler
        truncated, then with ``truncated_step``, the step's proposed length); ``committed`` is
        how many tokens the row committed (kept drafts plus the target's own last token)."""
        context_lens = self.runner.input_batch.num_tokens_no_spec
        committed = (out != PLACEHOLDER_TOKEN_ID).sum(dim=1).tolist()
        lines, offset = [], 0
        for i, decision in enumerate(decisions):
            n = n_list[i]
            entry = {"req_id": req_ids[i], "context_len": int(context_lens[i]),
                     "drafted": draft_lists[offset: offset + n], "committed": int(committed[i])}
            if decision is not None:
                kept = {"committed_step": cut[i]} if decision.accepted else {}
                lines.append(json.dumps({
                    "kind": "step", **entry, "step_len": step_lens[i], **kept,
                    "lpbv": decision.lpbv, "abgv": decision.abgv, "score": decision.score,
                    "accepted": decision.accepted}))
            elif n > 0 and token_level[i]:
                extra = {"truncated_step": proposed[i]} if truncated[i] else {}
                lines.append(json.dumps({"kind": "token", **entry, **extra}))
            offset += n
        if lines:
            with open(self.decision_log, "a", encoding="utf-8") as log:
                log.write("\n".join(lines) + "\n")
