"""Everything SpecGuard keeps on one vLLM model runner, and what it does at each hook.

:class:`~specguard_vllm.plugin.patches.GPUModelRunnerPatch` builds one per runner (only
when the engine's speculative config asked for SpecGuard) and calls one method of it
per patched runner method. The proposer and the verifier it installs read it too.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from specguard_vllm.config import SpecGuardConfig, SpecGuardParams
from specguard_vllm.core.steps import StepSegmenter
from specguard_vllm.plugin.config_bridge import (
    check_grounding_attention,
    specguard_from_additional_config,
)
from specguard_vllm.plugin.grounding_capture import (
    GROUNDING_BACKENDS,
    GroundingCapture,
    TensorParallelRows,
    grounding_layer_names,
)
from specguard_vllm.plugin.host_transfer import array_to_device, copy_to_host
from specguard_vllm.plugin.request_params import resolve_opt_out, resolve_request_params
from specguard_vllm.plugin.step_state import NO_LENGTH, DraftRows, StepStateTable, StepVerdicts

logger = logging.getLogger("vllm.specguard")


class SpecGuardRunnerState:
    """SpecGuard's per-runner state: step table, hand-offs, grounding capture, metrics.

    Within one engine step the hand-offs run: the proposer's truncation records in the
    step table where each drafted step ends, the verifier of the next step takes it, and
    leaves its ``verdicts`` for :meth:`record_committed`. Every per-request fact lives in
    the table's arrays, read and written for the whole batch at once.
    """

    def __init__(self, runner, config: SpecGuardConfig):
        from vllm.tokenizers.registry import get_tokenizer

        from specguard_vllm.plugin.metrics import get_metrics
        from specguard_vllm.plugin.proposer import SpecGuardDraftProposer
        from specguard_vllm.plugin.verifier import SpecGuardRejectionSampler

        self.runner = runner
        self.config = config
        model_config = runner.model_config
        tokenizer = get_tokenizer(model_config.tokenizer,
                                  trust_remote_code=model_config.trust_remote_code)
        vocab_size = model_config.get_vocab_size()
        self.segmenter = StepSegmenter.from_tokenizer(
            tokenizer, config.specguard.step_delimiters, vocab_size=vocab_size)
        self.steps = StepStateTable(self.segmenter, config.specguard, resolve=self._resolve,
                                    capacity=runner.vllm_config.scheduler_config.max_num_seqs)
        # On the runner's device from the start: built inside the first engine step, the
        # transition table (states x vocabulary) and the EOS ids were blocking pageable copies.
        self.segmenter.table_on(runner.device)
        self._eos_ids: dict[torch.device, torch.Tensor] = {runner.device: torch.tensor(
            sorted(self.segmenter.eos_token_ids), dtype=torch.int64, device=runner.device)}
        self.verdicts: StepVerdicts | None = None  # this engine step's, from the verifier
        self.capture: GroundingCapture | None = None  # built on the first verification
        self.grounding_skipped = False  # this forward's rows all have beta = 1: no capture
        self.metrics = get_metrics(model_config.served_model_name
                                   if isinstance(model_config.served_model_name, str)
                                   else str(model_config.model))
        if not isinstance(runner.drafter, SpecGuardDraftProposer):
            raise RuntimeError(  # noqa: TRY004 - a plugin set-up problem, not a caller's type
                "SpecGuard: the draft proposer was not replaced; is the plugin "
                "registered before the model runner is built?")
        runner.drafter.metrics = self.metrics
        runner.drafter.segmenter = self.segmenter
        runner.drafter.proposable_ids = min(len(tokenizer), vocab_size)  # no padding ids
        if runner.device.type == "cpu":
            from specguard_vllm.plugin.patches import fix_cpu_expand_batch_to_tokens

            fix_cpu_expand_batch_to_tokens()  # P15
        runner.rejection_sampler = SpecGuardRejectionSampler(
            runner.sampler, runner.speculative_config, runner.device, state=self)
        logger.info("SpecGuard active: k=%d, tau=%.3f, beta=%.3f, %d grounding layers, delimiters=%r",
                    config.specguard.num_candidates, config.specguard.tau, config.specguard.beta,
                    config.specguard.grounding_layers, config.specguard.step_delimiters)

    @classmethod
    def for_runner(cls, runner) -> SpecGuardRunnerState | None:
        """The state for a freshly built runner; None unless its engine runs SpecGuard."""
        if getattr(runner, "speculative_config", None) is None:
            return None
        config = specguard_from_additional_config(runner.vllm_config.additional_config)
        return None if config is None else cls(runner, config)

    def _resolve(self, req_id: str):
        """A new request's knobs and opt-out (its ``vllm_xargs``) and its candidates' random
        streams, once per request, when it gets its slot in the step table."""
        request = getattr(self.runner, "requests", {}).get(req_id)
        return (resolve_request_params(request, self.config.specguard), resolve_opt_out(request),
                self.runner.drafter.request_streams(req_id, self.config.specguard.num_candidates))

    def request_params(self, req_id: str) -> SpecGuardParams:
        """The request's knobs, resolved when it got its slot in the step table."""
        return self.steps.get(req_id).params

    def batch_slots(self, num_rows: int | None = None) -> np.ndarray:
        """The step-table slots of the input batch's first ``num_rows`` rows (all by default)."""
        batch = self.runner.input_batch
        return self.steps.slots(batch.req_ids[: batch.num_reqs if num_rows is None else num_rows])

    # ------------------------------------------------------------------ target forward
    def before_target_forward(self) -> None:
        if self.capture is not None:
            self.capture.clear()
        self.verdicts = None
        self.grounding_skipped = False  # set again by arm_grounding for verification forwards

    def after_target_forward(self) -> None:
        if self.capture is not None:
            self.capture.disarm()

    def arm_grounding(self, num_draft_tokens) -> None:
        """Arm the capture for this forward's verification rows (built the first time).

        Not armed when no drafted row's score reads grounding (beta = 1 for every request
        with drafts, e.g. the latency-calibrated config): then no layer runs the capture
        kernels and the verifier scores on LPBV alone (``grounding_skipped``). Every TP rank
        sees the same requests and knobs, so all skip together.
        """
        if self.capture is None:
            self.refuse_unreadable_attention()
            self.capture = self._build_capture()
        num_draft_tokens = list(num_draft_tokens)
        self.grounding_skipped = not self._batch_reads_grounding(num_draft_tokens)
        if self.grounding_skipped:
            self.capture.clear()
        else:
            self.capture.arm(num_draft_tokens, self._widest_step_context(num_draft_tokens))

    def _widest_step_context(self, num_draft_tokens: list[int]) -> int | None:
        """The longest context of a request with drafts in this forward, bounded on the host
        from vLLM 0.32's ``optimistic_seq_lens_cpu`` (filled before this point of the step;
        every draft of the last step assumed accepted, so never short). None where the
        runner has no such array (the capture then reads the device)."""
        optimistic = getattr(self.runner, "optimistic_seq_lens_cpu", None)
        n = len(num_draft_tokens)
        if optimistic is None or optimistic.shape[0] < n:
            return None
        drafted = np.asarray(num_draft_tokens, dtype=np.int64) > 0
        contexts = optimistic[:n].numpy()[drafted]
        return int(contexts.max()) if contexts.size else 0

    def _batch_reads_grounding(self, num_draft_tokens: list[int]) -> bool:
        if self.runner.input_batch.num_reqs < len(num_draft_tokens):  # dummy / profiling runs
            return True
        slots = self.batch_slots(len(num_draft_tokens))
        drafted = np.asarray(num_draft_tokens, dtype=np.int64) > 0
        return bool((drafted & (self.steps.beta[slots] < 1.0)).any())

    def prepare_at_start(self, num_blocks: int) -> int:
        """Once the KV cache exists, before any request: build the grounding capture (refusing
        attention it cannot read) and reserve the candidates' scratch KV; returns its blocks."""
        if self.capture is None:
            self.refuse_unreadable_attention()
            self.capture = self._build_capture()
        return self.runner.drafter.bind_scratch(num_blocks)

    def _grounding_layers(self) -> tuple[dict, dict[str, int]]:
        context = self.runner.compilation_config.static_forward_context
        return context, grounding_layer_names(context.keys(), self.config.specguard.grounding_layers)

    def refuse_unreadable_attention(self) -> None:
        """Refuse, before vLLM builds the KV cache, grounding layers whose attention the capture
        cannot reproduce (backend, sliding window, ALiBi, soft-capping, quantised cache): vLLM's
        own KV set-up would otherwise fail first on some of them with a message about its
        internals (a sliding-window target: "All drafting layers should belong to the same kv
        cache group")."""
        context, positions = self._grounding_layers()
        for name in positions:
            check_grounding_attention(name, context[name].attn_backend.get_name(),
                                      context[name].impl, GROUNDING_BACKENDS)

    def _build_capture(self) -> GroundingCapture:
        context, positions = self._grounding_layers()
        backend = context[next(iter(positions))].attn_backend.get_name()
        capture = GroundingCapture(positions, self.config.specguard.attention_sparsity, backend,
                                   TensorParallelRows.for_runner(self.runner, len(positions)))
        capture.attach_to(context[name] for name in positions)
        logger.info("SpecGuard grounding layers (%s): %s", backend, sorted(positions, key=positions.get))
        return capture

    # ------------------------------------------------------------------ after sampling
    def record_committed(self, output_token_ids: torch.Tensor) -> None:
        """Update the batch's step state from what this engine step committed (array ops)."""
        batch = self.runner.input_batch
        num_reqs = batch.num_reqs
        # vLLM reads the same tokens in its bookkeeping, but only after drafting, and the
        # step table must know them before the proposer runs.
        tokens = copy_to_host(output_token_ids[:num_reqs], "committed_tokens").numpy() \
            .astype(np.int64).reshape(num_reqs, -1)
        committed = (tokens >= 0) & (tokens < batch.vocab_size)  # -1: vLLM's placeholder
        committed &= ~self.runner.discard_request_mask.np[:num_reqs, None].astype(bool)
        if (committed[:, 1:] & ~committed[:, :-1]).any():  # vLLM commits a prefix of each row;
            # should a row ever have a gap, its committed tokens are moved first, in order
            order = np.argsort(~committed, axis=1, kind="stable")
            tokens = np.take_along_axis(tokens, order, axis=1)
        slots = self.batch_slots(num_reqs)
        req_ids = batch.req_ids[:num_reqs]
        if self.verdicts is not None:
            kinds, step_lens = self.verdicts.for_batch(req_ids)
        else:
            kinds = np.zeros(num_reqs, dtype=np.int8)
            step_lens = np.full(num_reqs, NO_LENGTH, dtype=np.int64)
        self.steps.after_sampling_rows(slots, tokens, committed.sum(axis=1), kinds, step_lens)
        self.metrics.set_tracked(len(self.steps))

    # ------------------------------------------------------------------ drafting
    def draft_rows(self) -> DraftRows:
        """What the proposer needs of this batch's rows (open step's state, mode, fallback)."""
        return self.steps.draft_rows(self.batch_slots())

    def _first_eos_ends(self, drafts: torch.Tensor) -> torch.Tensor:
        """Per row, the position after its first EOS (0: none), in tensor ops."""
        eos = self._eos_ids.get(drafts.device)
        if eos is None:
            eos = self._eos_ids[drafts.device] = torch.tensor(
                sorted(self.segmenter.eos_token_ids), dtype=drafts.dtype, device=drafts.device)
        if eos.numel() == 0 or drafts.shape[1] == 0:
            return torch.zeros(drafts.shape[0], dtype=torch.int64, device=drafts.device)
        is_eos = torch.isin(drafts, eos)
        first = is_eos.to(torch.int8).argmax(dim=1).to(torch.int64) + 1
        return torch.where(is_eos.any(dim=1), first, 0)

    def truncate_drafts(self, drafts):
        """Cut each proposed row after its step delimiter; no drafts while regenerating.

        Requests with ``fallback: speculative`` keep the draft past the step's end: the
        verifier judges the step and verifies the tail token-level (SPECGUARD.md section 4).
        The step ends come from the proposer (found on the device while drafting); the rows,
        their step ends, first EOS and lengths reach the host in one transfer, and are cut
        in array ops; only the lists vLLM's scheduler takes are built per row.
        """
        if not isinstance(drafts, torch.Tensor):
            return drafts
        num_reqs = drafts.shape[0]
        slots = self.batch_slots(num_reqs)
        step_ends = self.runner.drafter.chosen_step_ends
        if step_ends is None or step_ends.shape[0] != num_reqs:
            step_ends = self.segmenter.step_lengths(
                drafts, array_to_device(self.steps.open_state[slots], drafts.device))
        # A tail stopped by tail_min_prob: the row's length (the whole row otherwise).
        draft_lens = self.runner.drafter.chosen_draft_lens
        if draft_lens is None or draft_lens.shape[0] != num_reqs:
            draft_lens = drafts.new_full((num_reqs,), drafts.shape[1])
        # vLLM's own SD reads its drafts to the host here too; the step ends ride along.
        host = copy_to_host(torch.cat(
            [drafts.to(torch.int64), step_ends.to(torch.int64).unsqueeze(1),
             self._first_eos_ends(drafts).unsqueeze(1), draft_lens.to(torch.int64).unsqueeze(1)],
            dim=1), "drafted_rows").numpy().reshape(num_reqs, -1)
        width = host.shape[1] - 3
        lengths, step_lens = self.steps.truncate_rows(slots, host[:, width + 2], host[:, width],
                                                      host[:, width + 1])
        # The proposed step's length (the whole row unless it has a tail), so the verifier
        # can tell a step the scheduler truncated.
        self.steps.record_proposed(slots, np.where(step_lens == NO_LENGTH, lengths, step_lens))
        return [row[:n] for row, n in zip(host[:, :width].tolist(), lengths.tolist())]

    # ------------------------------------------------------------------ request lifetime
    def forget(self, finished_req_ids) -> None:
        """Drop the state of requests vLLM has finished or aborted."""
        self.steps.forget(finished_req_ids)
        self.runner.drafter.forget(finished_req_ids)
        self.metrics.set_tracked(len(self.steps))
