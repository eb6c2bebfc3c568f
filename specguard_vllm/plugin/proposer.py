"""The step proposer: k draft candidates per request in one batched draft loop.

Built on vLLM's ``DraftModelProposer`` (so the draft KV-cache plumbing, the
lookahead slots and every ``isinstance`` check keep working). Per engine step:

1. the stock first pass: the draft catches up on the tokens the target just
   verified (once, on B rows) and gives the logits of the first step token;
2. k first tokens per request are sampled from those logits at
   ``draft_temperature``; the remaining K-1 tokens are drafted on B*k rows in
   one batched pass per position (not k sequential loops);
3. candidate 0 of each request uses the request's own block table and
   lookahead slots; candidates 1..k-1 read the shared prefix blocks through
   the block table and write into private scratch blocks: a copy of the
   request's tail block plus overflow blocks (copy-on-write), which live in
   extra blocks appended to the draft layers' KV tensors that the scheduler
   never sees;
4. the loop stops early once every candidate has ended its step;
5. the self-consistency selector keeps the most central candidate.

Returns ``[B, K]``; the runner's SpecGuard state cuts each row after its step delimiter.
"""

from __future__ import annotations

import hashlib
import logging
import time

import torch
from vllm.forward_context import set_forward_context
from vllm.v1.spec_decode.draft_model import DraftModelProposer

from specguard_vllm.core.selector import select_candidate
from specguard_vllm.core.steps import StepSegmenter
from specguard_vllm.plugin.config_bridge import specguard_from_additional_config
from specguard_vllm.plugin.step_state import DraftRowHint

logger = logging.getLogger("vllm.specguard")


def _hash_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints and lists (stable across processes)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class SpecGuardDraftProposer(DraftModelProposer):
    """DraftModelProposer that drafts whole steps with k candidates (inert without SpecGuard)."""

    def __init__(self, vllm_config, device, runner=None):
        super().__init__(vllm_config=vllm_config, device=device, runner=runner)
        self.specguard = specguard_from_additional_config(vllm_config.additional_config)
        # Set by the runner's SpecGuard state: the step segmenter and metrics once, the
        # hints of this batch's rows before each propose.
        self.segmenter: StepSegmenter | None = None
        self.metrics = None
        self.row_hints: list[DraftRowHint] | None = None
        self._scratch_base: int | None = None
        self._scratch_blocks_per_row = 0
        self._owner = runner
        # One draft sampler per request, seeded from the config seed, the request's own
        # seed and its prompt: the same request drafts the same candidates whatever else
        # is in the batch, so a greedy request is reproducible under continuous batching.
        self._seeds: dict[str, int] = {}
        self._generators: list[torch.Generator] = []

    # ------------------------------------------------------------------ sampling
    def _request_seed(self, req_id: str) -> int:
        seed = self._seeds.get(req_id)
        if seed is None:
            seed = self.specguard.specguard.seed or 0
            request = getattr(self._owner, "requests", {}).get(req_id)
            if request is not None:
                params = getattr(request, "sampling_params", None)
                request_seed = getattr(params, "seed", None) or 0
                prompt = getattr(request, "prompt_token_ids", None) or []
                seed = _hash_seed(seed, request_seed, list(prompt))
            self._seeds[req_id] = seed
        return seed

    def _step_generators(self, req_ids: list[str], positions: list[int]) -> list[torch.Generator]:
        """A fresh sampler per request and step, seeded by (request seed, step position).

        The draws of one step therefore never depend on how many draws other steps
        made, nor on which other requests share the batch (the batched loop keeps
        drawing for a request whose candidates have already ended their step).
        """
        generators = []
        for req_id, position in zip(req_ids, positions):
            generator = torch.Generator(device=self.device)
            generator.manual_seed(_hash_seed(self._request_seed(req_id), position))
            generators.append(generator)
        return generators

    def forget(self, req_ids) -> None:
        for req_id in req_ids:
            self._seeds.pop(req_id, None)

    def _sample(self, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens at draft_temperature and their raw (T=1) draft log-probs; rows = request*k."""
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        temperature = self.specguard.specguard.draft_temperature
        if temperature == 0.0:
            tokens = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            tokens = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
            for i, generator in enumerate(self._generators):
                rows = slice(i * k, (i + 1) * k)
                tokens[rows] = torch.multinomial(probs[rows], 1, generator=generator).squeeze(-1)
        return tokens, logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)

    # ------------------------------------------------------------------ scratch KV
    def _draft_layers(self):
        context = self.vllm_config.compilation_config.static_forward_context
        return [(name, layer) for name, layer in context.items()
                if name.startswith("draft_model.") and isinstance(getattr(layer, "kv_cache", None),
                                                                   torch.Tensor)]

    def ensure_scratch(self, num_candidates: int, max_step: int) -> None:
        """Append private blocks for candidates 1..k-1 to every draft layer's KV tensor."""
        if num_candidates <= 1 or self._scratch_base is not None:
            return
        layers = self._draft_layers()
        if not layers:
            raise RuntimeError("SpecGuard: no draft-model attention layers found for scratch KV")
        bs = self.block_size
        per_row = -(-(bs - 1 + max_step) // bs) + 1  # blocks positions p..p+K-1 can touch
        rows = self.vllm_config.scheduler_config.max_num_seqs * (num_candidates - 1)
        extra = rows * per_row
        base = None
        for _, layer in layers:
            kv = layer.kv_cache
            grown = torch.zeros((kv.shape[0] + extra, *kv.shape[1:]), dtype=kv.dtype, device=kv.device)
            grown[: kv.shape[0]].copy_(kv)
            if base is None:
                base = kv.shape[0]
            elif base != kv.shape[0]:
                raise RuntimeError("SpecGuard: draft layers disagree on the number of KV blocks")
            layer.kv_cache = grown
        self._scratch_base = base
        self._scratch_blocks_per_row = per_row
        mib = sum(layer.kv_cache[base:].numel() * layer.kv_cache.element_size()
                  for _, layer in layers) / 2**20
        logger.info("SpecGuard: %d scratch KV blocks per draft layer for %d candidates (%.1f MiB)",
                    extra, num_candidates, mib)

    def _expanded_block_table(self, block_table: torch.Tensor, positions: torch.Tensor, k: int):
        """Block table of B*k rows: candidates >= 1 get private tail/overflow blocks (COW)."""
        expanded = block_table.repeat_interleave(k, dim=0).clone()
        if k == 1:
            return expanded
        bs = self.block_size
        per_row = self._scratch_blocks_per_row
        num_reqs = block_table.shape[0]
        tail_col = (positions // bs).to(torch.int64)  # [B] block holding the first draft slot
        max_cols = block_table.shape[1]
        layers = self._draft_layers()
        src_blocks, dst_blocks = [], []
        for i in range(num_reqs):
            col = int(tail_col[i])
            for c in range(1, k):
                row = i * k + c
                scratch0 = self._scratch_base + (i * (k - 1) + (c - 1)) * per_row
                for t in range(per_row):
                    if col + t < max_cols:
                        expanded[row, col + t] = scratch0 + t
                src_blocks.append(int(block_table[i, col]))
                dst_blocks.append(scratch0)
        if src_blocks:
            src = torch.tensor(src_blocks, device=block_table.device, dtype=torch.int64)
            dst = torch.tensor(dst_blocks, device=block_table.device, dtype=torch.int64)
            for _, layer in layers:
                layer.kv_cache.index_copy_(0, dst, layer.kv_cache.index_select(0, src))
        return expanded

    # ------------------------------------------------------------------ propose
    def propose(self, num_speculative_tokens, target_token_ids, target_positions,
                target_hidden_states, next_token_ids, token_indices_to_sample,
                common_attn_metadata, sampling_metadata, mm_embed_inputs=None,
                num_rejected_tokens_gpu=None, slot_mappings=None):
        if self.specguard is None:
            return super().propose(
                num_speculative_tokens, target_token_ids, target_positions, target_hidden_states,
                next_token_ids, token_indices_to_sample, common_attn_metadata, sampling_metadata,
                mm_embed_inputs, num_rejected_tokens_gpu, slot_mappings)
        started = time.perf_counter()
        K = num_speculative_tokens
        k = self.specguard.specguard.num_candidates
        self.num_speculative_tokens = K
        self._last_draft_probs = None
        num_reqs = common_attn_metadata.batch_size()

        # 1. Stock first pass: draft KV catch-up, logits of the first step token.
        num_tokens, sample_idx, cad = self.set_inputs_first_pass(
            target_token_ids=target_token_ids, next_token_ids=next_token_ids,
            target_positions=target_positions, target_hidden_states=target_hidden_states,
            token_indices_to_sample=token_indices_to_sample, cad=common_attn_metadata,
            num_rejected_tokens_gpu=num_rejected_tokens_gpu)
        _, per_layer = self.build_per_group_and_layer_attn_metadata(cad)
        mode, num_input_tokens, across_dp = self._determine_batch_execution_and_padding(num_tokens)
        model_kwargs, slot_size = self.build_model_inputs_first_pass(
            num_tokens, num_input_tokens, mm_embed_inputs)
        with set_forward_context(per_layer, self.vllm_config, num_tokens=num_input_tokens,
                                 num_tokens_across_dp=across_dp, cudagraph_runtime_mode=mode,
                                 slot_mapping=self._get_slot_mapping(slot_size, cad.slot_mapping)):
            hidden = self.model(**model_kwargs)
        if isinstance(hidden, tuple):
            hidden = hidden[0]
        first_logits = self.model.compute_logits(hidden[sample_idx])
        if K == 0:
            return torch.empty(num_reqs, 0, dtype=torch.int64, device=hidden.device)

        rows = num_reqs * k
        req_ids = list(self._owner.input_batch.req_ids[:num_reqs]) if self._owner is not None \
            else [str(i) for i in range(num_reqs)]
        if self.specguard.specguard.draft_temperature > 0.0:
            bonus_positions = self.positions[sample_idx][:num_reqs].tolist()
            self._generators = self._step_generators(req_ids, bonus_positions)
        tokens_out = torch.zeros(rows, K, dtype=torch.int64, device=hidden.device)
        logprobs_out = torch.zeros(rows, K, dtype=torch.float32, device=hidden.device)
        token, lp = self._sample(first_logits.repeat_interleave(k, dim=0), k)
        tokens_out[:, 0], logprobs_out[:, 0] = token, lp
        length = 1

        hints = self.row_hints if self.row_hints is not None and len(self.row_hints) == num_reqs \
            else [DraftRowHint()] * num_reqs
        done = self._rows_done(tokens_out, 1, hints, k)
        if K > 1 and not all(done):
            positions = self.positions[sample_idx][:num_reqs].clone()  # position of token 0
            self.ensure_scratch(k, K)
            seq_lens = cad.seq_lens[:num_reqs].clone()
            block_table = cad.block_table_tensor[:num_reqs]
            cad_e = cad.replace(
                num_reqs=rows, num_actual_tokens=rows, max_query_len=1,
                query_start_loc=self.arange[: rows + 1],
                query_start_loc_cpu=torch.arange(rows + 1, dtype=torch.int32),
                seq_lens=seq_lens.repeat_interleave(k),
                seq_lens_cpu_upper_bound=None if cad.seq_lens_cpu_upper_bound is None else
                cad.seq_lens_cpu_upper_bound[:num_reqs].repeat_interleave(k),
                block_table_tensor=self._expanded_block_table(block_table, positions, k),
                slot_mapping=self._slot_mapping_buffer[:rows],
                positions=None, is_prefilling=None, req_idx=None, dcp_local_seq_lens=None,
                logits_indices_padded=None, num_logits_indices=None,
                _num_computed_tokens_cache=None, _token_to_req_indices_cache=None,
            )
            if num_rejected_tokens_gpu is not None:
                # In the padded first pass, seq_lens count rejected slots: drop them.
                cad_e.seq_lens = cad_e.seq_lens - num_rejected_tokens_gpu[:num_reqs].repeat_interleave(k)
            positions_e = positions.repeat_interleave(k)
            mode, padded_rows, across_dp = self._determine_batch_execution_and_padding(rows)
            for step in range(1, K):
                positions_e = self._update_positions_dependent_metadata(
                    positions_e, cad_e, rows, padded_rows, self.block_size)
                _, per_layer = self.build_per_group_and_layer_attn_metadata(cad_e, draft_index=step)
                self.input_ids[:rows] = token.to(self.input_ids.dtype)
                with set_forward_context(per_layer, self.vllm_config, num_tokens=padded_rows,
                                         num_tokens_across_dp=across_dp,
                                         cudagraph_runtime_mode=mode,
                                         slot_mapping=self._get_slot_mapping(padded_rows)):
                    hidden = self.model(input_ids=self.input_ids[:padded_rows],
                                        positions=self._get_positions(padded_rows),
                                        inputs_embeds=None)
                if isinstance(hidden, tuple):
                    hidden = hidden[0]
                token, lp = self._sample(self.model.compute_logits(hidden[:rows]), k)
                tokens_out[:, step], logprobs_out[:, step] = token, lp
                length = step + 1
                done = self._rows_done(tokens_out[:, :length], length, hints, k)
                if all(done):
                    break

        chosen = self._select(tokens_out[:, :length], logprobs_out[:, :length], hints, k)
        if self.metrics is not None:
            # The first pass plus one batched pass per further position drafted.
            self.metrics.observe_draft(time.perf_counter() - started, forward_passes=length)
        return chosen

    def _step_end(self, candidate: list[int], open_step: list[int]) -> int | None:
        return None if self.segmenter is None else self.segmenter.step_length(candidate, prefix=open_step)

    def _rows_done(self, tokens: torch.Tensor, length: int, hints: list[DraftRowHint],
                   k: int) -> list[bool]:
        """Per request: every candidate has ended its step (or no draft is needed).

        A request that drafts full rows (``fallback: speculative``: the tail past the step
        is verified token-level) is done only at K tokens.
        """
        if self.segmenter is None:
            return [False] * (tokens.shape[0] // k)
        as_list = tokens.tolist()
        return [hint.needs_no_draft or (not hint.drafts_past_step and all(
            self._step_end(as_list[i * k + c], hint.open_step) is not None for c in range(k)))
            for i, hint in enumerate(hints)]

    def _select(self, tokens: torch.Tensor, logprobs: torch.Tensor, hints: list[DraftRowHint],
                k: int) -> torch.Tensor:
        """Keep the most central candidate per request; returns ``[B, K]`` (0-padded)."""
        num_reqs = tokens.shape[0] // k
        out = torch.zeros(num_reqs, self.num_speculative_tokens, dtype=torch.int64,
                          device=tokens.device)
        as_list, lp_list = tokens.tolist(), logprobs.tolist()
        measure = self.specguard.specguard.selector
        for i in range(num_reqs):
            open_step = hints[i].open_step  # candidates are compared on their step part only
            cands, loglik = [], []
            for c in range(k):
                cand = as_list[i * k + c]
                end = self._step_end(cand, open_step)
                n = len(cand) if end is None else end
                cands.append(cand[:n])
                loglik.append(sum(lp_list[i * k + c][:n]))
            best = select_candidate(cands, loglik, measure) if k > 1 else 0
            row = as_list[i * k + best]
            out[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        return out
