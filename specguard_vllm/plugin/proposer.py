"""The step proposer: k draft candidates per request in one batched draft loop.

Built on vLLM's ``DraftModelProposer`` (so the draft KV-cache plumbing, the
lookahead slots and every ``isinstance`` check keep working). Per engine step:

1. the stock first pass: the draft catches up on the tokens the target just
   verified (once, on B rows) and gives the logits of the first step token;
2. k first tokens per request are sampled from those logits at
   ``draft_temperature``; the remaining K-1 tokens are drafted on the candidate
   rows in one batched pass per position (not k sequential loops). The rows are
   ragged: a request that turned SpecGuard off (or needs no draft) has one row,
   drafted greedily as vLLM's own SD drafts; every other request has k;
3. candidate 0 of each request uses the request's own block table and
   lookahead slots; candidates 1..k-1 read the shared prefix blocks through
   the block table and write into private scratch blocks: a copy of the
   request's tail block plus overflow blocks (copy-on-write), which live in
   extra blocks appended to the draft layers' KV tensors that the scheduler
   never sees;
4. each row's step end is tracked on the device by the step segmenter's automaton
   (one table gather per position, no text decoded). Once all k candidates of a request
   have ended the step, its rows are settled (in groups, see row_compaction): the
   selector chooses among them and only the chosen row drafts on to K tokens (fallback
   ``speculative``, SpecGuard off) or none does; the loop ends when no row is left. A
   row past its step's end drafts greedily (its tail, as vLLM's SD drafts), and with
   ``tail_min_prob`` its draft ends after its first unsure tail token (the loop ends once
   every tail has); once only tails are left (known on the host) nothing is sampled. The
   "done" flags reach the host once per position (on CUDA one position late, from
   pinned memory, so the host never stalls the device for them);
5. the self-consistency selector keeps the most central candidate of the requests
   still to choose, all at once in tensor ops.

Returns ``[B, K]`` and leaves the chosen rows' step ends in :attr:`chosen_step_ends`;
the runner's SpecGuard state cuts each row after its step delimiter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from vllm.forward_context import set_forward_context
from vllm.v1.spec_decode.draft_model import DraftModelProposer

from specguard_vllm.core.selector import select_candidates_batched
from specguard_vllm.core.steps import StepSegmenter
from specguard_vllm.kernels.dispatch import draft_position
from specguard_vllm.kernels.draft_sampling_ref import DraftRowState, StepTable
from specguard_vllm.plugin.config_bridge import specguard_from_additional_config, trust_engine_pair
from specguard_vllm.plugin.host_transfer import array_to_device, rows_to_device, waits_for_device
from specguard_vllm.plugin.keyed_sampling import row_stream, uniforms_at
from specguard_vllm.plugin.row_compaction import RowCompaction
from specguard_vllm.plugin.step_state import DraftRows

logger = logging.getLogger("vllm.specguard")


def _hash_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints, strings and lists (stable across processes)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


_GREEDY_TEMPERATURE = 1e-5  # vLLM's own threshold: below it a request is sampled greedily


@dataclass(frozen=True)
class CandidateRows:
    """The ragged candidate rows of one propose call: request ``i`` owns rows
    ``starts[i] .. starts[i] + counts[i] - 1``, its candidate 0 first."""

    counts: list[int]  # host: candidates per request
    starts: list[int]  # host: first row of each request
    counts_t: torch.Tensor  # [B] int64, on the device
    starts_t: torch.Tensor  # [B] int64
    req_of_row: torch.Tensor  # [R] int64: the request of each row
    cand_of_row: torch.Tensor  # [R] int64: the candidate index of each row
    streams: torch.Tensor  # [R] int64: row_streams(request key, cand_of_row), hashed on the host
    greedy: torch.Tensor | None  # [R] bool: rows drafted greedily (None: no such row)
    open_states: torch.Tensor  # [R] int64: the segmenter state of the request's open step
    waits: torch.Tensor  # [R] bool: drafting goes on until this row's step has ended
    request_waits: np.ndarray  # [B] bool, host: the same per request
    # [R] float32: a tail token whose draft log-prob is below this ends the row's draft
    # (log tail_min_prob; -inf for rows drafted as vLLM's SD). None: tails never stop.
    tail_stop_below: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.req_of_row.shape[0]


class LaggedRead:
    """A small device tensor's value one post late, never stalling the device: each post
    copies it to a double-buffered pinned slot asynchronously and reads the previous post's,
    by when the next forward is already queued (the wait is named ``site``, see
    host_transfer). CUDA only."""

    def __init__(self, size: int, dtype: torch.dtype, site: str):
        self.site = site
        self._posted = 0
        self._slots = [(torch.zeros(size, dtype=dtype, pin_memory=True), torch.cuda.Event())
                       for _ in range(2)]

    def post(self, value: torch.Tensor) -> np.ndarray | None:
        """Post ``value``; the previous post's value (host), None after the first post."""
        buffer, event = self._slots[self._posted % 2]
        buffer.copy_(value, non_blocking=True)
        event.record()
        self._posted += 1
        if self._posted < 2:
            return None
        previous, previous_event = self._slots[self._posted % 2]
        with waits_for_device(self.site, value.device):
            previous_event.synchronize()
        return previous.numpy().copy()


class StepEndPoll:
    """Which requests' candidates have all ended their step, read without stalling the device.

    Elsewhere than CUDA the rows' open flags are read at once (a view, no copy) and summed
    per request in NumPy, which also tells whether any row is past its step yet. On CUDA
    each position's per-request flags are copied to pinned memory asynchronously and the
    previous position's are read: by then the next forward is already queued, so the device
    never idles for the host, and a request's rows are dropped at most one position later
    than they could be.
    """

    def __init__(self, device: torch.device, num_reqs: int):
        self.num_reqs = num_reqs
        # Host-known after each post (not lagged only): every live row's step is still open.
        self.all_open = False
        self._lagged = LaggedRead(num_reqs, torch.bool, "step_end_poll") \
            if device.type == "cuda" else None

    def post(self, live: _LiveRows) -> np.ndarray | None:
        """Post this position's flags; returns the latest per-request ``[B]`` done flags
        readable now (host), None while there are none yet."""
        if self._lagged is None:
            open_rows = live.open_host()
            open_per_request = np.bincount(live.req_host, weights=open_rows,
                                           minlength=self.num_reqs)
            self.all_open = bool(open_rows.all())
            # A request waits for its rows' step ends, or (no draft needed) for none.
            return (open_per_request == 0) | ~live.request_waits
        return self._lagged.post(live.requests_done(self.num_reqs))


class TailPoll:
    """Whether any live row's tail still drafts, read without stalling the device: elsewhere
    than CUDA through a NumPy view of the rows' flags; on CUDA the previous position's flag
    (LaggedRead), so the loop ends at most one forward late. How long each row's draft is
    does not depend on when the loop ends (_LiveRows.kept)."""

    def __init__(self, device: torch.device):
        self._lagged = LaggedRead(1, torch.bool, "tail_poll") if device.type == "cuda" else None

    def any_going(self, live: _LiveRows) -> bool:
        if self._lagged is None:
            return bool(live.tail_open_host().any())
        going = self._lagged.post(live.tail_open.any().view(1))
        return True if going is None else bool(going[0])


def scratch_blocks_per_row(block_size: int, max_step: int) -> int:
    """Scratch blocks one extra candidate needs: those positions p..p+K-1 can touch, plus one."""
    return -(-(block_size - 1 + max_step) // block_size) + 1


class SpecGuardDraftProposer(DraftModelProposer):
    """DraftModelProposer that drafts whole steps with k candidates (inert without SpecGuard)."""

    def __init__(self, vllm_config, device, runner=None):
        super().__init__(vllm_config=vllm_config, device=device, runner=runner)
        self.specguard = specguard_from_additional_config(vllm_config.additional_config)
        if self.specguard is not None:
            trust_engine_pair(vllm_config.speculative_config)  # P13 in this worker
        # Set by the runner's SpecGuard state: the step segmenter and metrics once, what
        # it knows of this batch's rows before each propose.
        self.segmenter: StepSegmenter | None = None
        self.metrics = None
        self.draft_rows: DraftRows | None = None
        self._scratch_base: int | None = None
        self._scratch_blocks_per_row = 0
        # CPU only: where the copy-on-write stages the tail blocks (see _copy_tail_blocks).
        self._tail_staging: dict[tuple, torch.Tensor] = {}
        # Ids the draft may propose: the shared tokenizer's (set by the runner's SpecGuard
        # state). A draft whose embedding is padded past it never proposes a padding id.
        self.proposable_ids: int | None = None
        self._owner = runner
        # Each request's draft-randomness key (see _request_key) and its candidates' random
        # streams (keyed_sampling.row_stream), computed once per request.
        self._request_keys: dict[str, int] = {}
        self._request_streams: dict[str, list[int]] = {}
        # [B] on the device after each propose: where the chosen row's step ends (its
        # length up to and including the delimiter; 0: no step end within the row).
        self.chosen_step_ends: torch.Tensor | None = None
        # [B] on the device after each propose with tail_min_prob > 0: how many of the chosen
        # row's tokens to propose (its tail stopped there); None: the whole row.
        self.chosen_draft_lens: torch.Tensor | None = None

    # ------------------------------------------------------------------ sampling
    def _request_key(self, req_id: str) -> int:
        """The 63-bit key of a request's draft randomness, the same on every TP rank.

        Seeded request: the config seed, its seed and its prompt, so it drafts the same
        candidates on every run whatever else is in the batch (vLLM gives seeded n > 1
        siblings seed + index). Unseeded greedy request (temperature 0): the config seed
        and its prompt, so a greedy request writes the same text every time, as it does
        without speculation. Unseeded sampled request: the config seed, the engine's seed
        and the request id, which vLLM makes unique per request and per n > 1 sibling, so
        repeats of a prompt draw independent candidates. Never per-process randomness,
        which would make tensor-parallel ranks draft differently.
        """
        key = self._request_keys.get(req_id)
        if key is None:
            config_seed = self.specguard.specguard.seed
            request = getattr(self._owner, "requests", {}).get(req_id)
            params = getattr(request, "sampling_params", None)
            request_seed = getattr(params, "seed", None)
            temperature = getattr(params, "temperature", None)
            prompt = list(getattr(request, "prompt_token_ids", None) or [])
            if request_seed is not None:
                key = _hash_seed("seeded", config_seed, request_seed, prompt)
            elif temperature is not None and temperature < _GREEDY_TEMPERATURE:
                key = _hash_seed("greedy", config_seed, prompt)
            else:
                engine_seed = getattr(self.vllm_config.model_config, "seed", None)
                key = _hash_seed("unseeded", config_seed, engine_seed, req_id)
            self._request_keys[req_id] = key
        return key

    def request_streams(self, req_id: str, k: int) -> list[int]:
        """The random streams of a request's k candidates (host ints, hashed once; the runner's
        step table keeps them per request slot)."""
        streams = self._request_streams.get(req_id)
        if streams is None or len(streams) < k:
            key = self._request_key(req_id)
            streams = self._request_streams[req_id] = [row_stream(key, c) for c in range(k)]
        return streams

    def forget(self, req_ids) -> None:
        for req_id in req_ids:
            self._request_keys.pop(req_id, None)
            self._request_streams.pop(req_id, None)

    def _candidate_rows(self, batch: DraftRows, req_ids: list[str], k: int,
                        device: torch.device) -> CandidateRows:
        """k rows per request; one for a request with SpecGuard off (drafted greedily, as
        vLLM's SD drafts) or one that needs no draft. Host arrays, then one host-to-device
        copy, no sync and no loop over requests."""
        counts = np.where(batch.opted_out | batch.needs_no_draft, 1, k).astype(np.int64)
        waits = ~batch.needs_no_draft
        streams = batch.streams if batch.streams is not None \
            else np.array([self.request_streams(r, k) for r in req_ids], dtype=np.int64)
        starts = np.cumsum(counts) - counts
        rows = int(counts.sum())
        cand_host = np.arange(rows) - np.repeat(starts, counts)
        row_streams = streams.reshape(len(req_ids), -1)[np.repeat(np.arange(len(req_ids)), counts),
                                                         cand_host]
        on_device = array_to_device(np.concatenate([
            counts, batch.opted_out.astype(np.int64), batch.open_states.astype(np.int64),
            waits.astype(np.int64), row_streams]), device)
        n = len(req_ids)
        counts_t, greedy_t, states_t, waits_t = on_device[: 4 * n].view(4, n).unbind(0)
        tail_min_prob = self.specguard.specguard.tail_min_prob
        stop_below = None
        if tail_min_prob > 0.0:
            # A request drafted as vLLM's SD (SpecGuard off) keeps SD's tails: never stopped.
            stop_below = torch.where(greedy_t.bool(), -math.inf, math.log(tail_min_prob)) \
                .to(torch.float32)
        req_of_row = torch.repeat_interleave(counts_t, output_size=rows)
        starts_t = counts_t.cumsum(0) - counts_t
        cand_of_row = torch.arange(rows, device=device) - starts_t[req_of_row]
        return CandidateRows(
            counts=counts.tolist(), starts=starts.tolist(), counts_t=counts_t, starts_t=starts_t,
            req_of_row=req_of_row, cand_of_row=cand_of_row, streams=on_device[4 * n:],
            greedy=greedy_t.bool()[req_of_row] if batch.opted_out.any() else None,
            open_states=states_t[req_of_row], waits=waits_t.bool()[req_of_row],
            request_waits=waits,
            tail_stop_below=None if stop_below is None else stop_below[req_of_row])

    def _draws(self, live: _LiveRows, positions: int) -> torch.Tensor | None:
        """Every row's keyed uniforms at its next ``positions`` draft positions, ``[R, K]``
        (None at draft_temperature 0: nothing is sampled). A row's draws depend only on its
        stream and position (keyed_sampling), so a request's tokens do not depend on the batch.
        """
        if not self.specguard.specguard.draft_temperature > 0.0:
            return None
        return uniforms_at(live.streams.unsqueeze(1), live.positions.unsqueeze(1)
                           + torch.arange(positions, device=live.positions.device))

    def _draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The draft's logits over the tokenizer's ids only (columns past it are padding rows).

        Dropping the columns is the mask: token ids keep their values, and softmax and
        log-probs are those of the draft restricted to real tokens.
        """
        logits = self.model.compute_logits(hidden)
        if self.proposable_ids is not None and logits.shape[-1] > self.proposable_ids:
            logits = logits[:, : self.proposable_ids]
        return logits

    def _raise_if_vocab_size_mismatch(self):
        """vLLM refuses any draft embedding size but the target's; a SpecGuard engine compared
        the two tokenizers at start instead (``check_draft_vocab``) and masks padding ids."""
        if specguard_from_additional_config(self.vllm_config.additional_config) is None:
            super()._raise_if_vocab_size_mismatch()

    # ------------------------------------------------------------------ scratch KV
    def _draft_layers(self):
        context = self.vllm_config.compilation_config.static_forward_context
        return [(name, layer) for name, layer in context.items()
                if name.startswith("draft_model.") and isinstance(getattr(layer, "kv_cache", None),
                                                                   torch.Tensor)]

    def bind_scratch(self, num_blocks: int) -> int:
        """Reserve the top blocks of vLLM's KV pool as the candidates' scratch; returns how many.

        Called once the KV cache exists, before any request (patch P14). The engine core
        takes these blocks out of the scheduler's pool, so the scratch lives inside the
        KV budget vLLM sized from free memory: nothing is allocated or copied here, and
        block ids stay shared by every layer (the target's pages of these blocks go
        unused). Sized for the configured k and K, every request drafting at once.
        """
        if self.specguard is None or self._scratch_base is not None:
            return self.scratch_blocks
        k = self.specguard.specguard.num_candidates
        if k <= 1:
            return 0
        max_step = self.vllm_config.speculative_config.num_speculative_tokens
        per_row = scratch_blocks_per_row(self.block_size, max_step)
        reserved = self.vllm_config.scheduler_config.max_num_seqs * (k - 1) * per_row
        if reserved > num_blocks - 2:  # the null block and one block for a request remain
            raise ValueError(
                f"SpecGuard: the KV cache holds {num_blocks} blocks, but the scratch KV of "
                f"{k - 1} extra candidates for max_num_seqs="
                f"{self.vllm_config.scheduler_config.max_num_seqs} requests needs {reserved} "
                f"({per_row} blocks of {self.block_size} tokens per candidate). Give the KV cache "
                "more memory, or lower max_num_seqs, num_candidates or num_speculative_tokens.")
        self._scratch_base = num_blocks - reserved
        self._scratch_blocks_per_row = per_row
        draft_page = sum(layer.kv_cache[0].numel() * layer.kv_cache.element_size()
                         for _, layer in self._draft_layers())
        logger.info("SpecGuard: scratch KV for %d extra candidates x %d requests: %d of vLLM's %d "
                    "KV blocks reserved at start (%.1f MiB of draft KV); the scheduler gets %d",
                    k - 1, self.vllm_config.scheduler_config.max_num_seqs, reserved, num_blocks,
                    reserved * draft_page / 2**20, num_blocks - reserved)
        return reserved

    @property
    def scratch_blocks(self) -> int:
        """Blocks reserved at the top of the KV pool for candidates 1..k-1 (0 for k = 1)."""
        if self._scratch_base is None:
            return 0
        return self.vllm_config.scheduler_config.max_num_seqs * \
            (self.specguard.specguard.num_candidates - 1) * self._scratch_blocks_per_row

    def ensure_scratch(self, num_candidates: int, max_step: int) -> None:
        """The scratch was reserved at start for the configured k and K (P14); check it."""
        if num_candidates > 1 and self._scratch_base is None:
            raise RuntimeError("SpecGuard: the k-candidate scratch KV was not reserved at start "
                               "(GPUModelRunner.initialize_kv_cache patch P14 did not run)")

    def _expanded_block_table(self, block_table: torch.Tensor, positions: torch.Tensor,
                              cand: CandidateRows) -> torch.Tensor:
        """Block table of the candidate rows: candidates >= 1 get private tail/overflow blocks.

        Candidate 0 keeps its request's row (and lookahead slots). The e-th candidate >= 1
        of the batch owns scratch blocks ``base + e*per_row ...``: a copy of its request's
        tail block (copy-on-write), then overflow. All rows at once, in tensor ops.
        """
        expanded = block_table.index_select(0, cand.req_of_row)
        num_extra = cand.rows - block_table.shape[0]
        if num_extra == 0:
            return expanded
        device, per_row = block_table.device, self._scratch_blocks_per_row
        extra_counts = cand.counts_t - 1
        req_of_extra = torch.repeat_interleave(extra_counts, output_size=num_extra)
        extra = torch.arange(num_extra, device=device)
        first_extra = extra_counts.cumsum(0) - extra_counts
        row = cand.starts_t[req_of_extra] + 1 + extra - first_extra[req_of_extra]
        tail_col = (positions[req_of_extra] // self.block_size).to(torch.int64)  # the bonus token's
        scratch0 = self._scratch_base + extra * per_row
        offsets = torch.arange(per_row, device=device)
        # Columns past the table's width land in a padding that is cut off again.
        max_cols = block_table.shape[1]
        padded = torch.cat([expanded, expanded.new_zeros(cand.rows, per_row)], dim=1)
        padded[row.unsqueeze(1), tail_col.unsqueeze(1) + offsets] = \
            (scratch0.unsqueeze(1) + offsets).to(padded.dtype)
        self._copy_tail_blocks(block_table[req_of_extra, tail_col].to(torch.int64), scratch0)
        return padded[:, :max_cols].contiguous()

    def _copy_tail_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy draft KV blocks ``src`` to ``dst`` in every draft layer (copy-on-write).

        On CPU the blocks are gathered into a buffer kept across steps: a fresh multi-MiB
        gather buffer per step page-faults (measured: 12 ms per call at batch 64 with
        128-token blocks, 0.2 ms into a kept buffer). CUDA's caching allocator reuses
        its memory, so there the gather needs no buffer of its own.
        """
        for _, layer in self._draft_layers():
            cache = layer.kv_cache
            if cache.device.type == "cuda":
                cache.index_copy_(0, dst, cache.index_select(0, src))
                continue
            key = (tuple(cache.shape[1:]), cache.dtype)
            staging = self._tail_staging.get(key)
            if staging is None or staging.shape[0] < src.shape[0]:
                rows = self.vllm_config.scheduler_config.max_num_seqs * \
                    (self.specguard.specguard.num_candidates - 1)
                staging = cache.new_empty((max(rows, src.shape[0]), *cache.shape[1:]))
                self._tail_staging[key] = staging
            gathered = staging[: src.shape[0]]
            torch.index_select(cache, 0, src, out=gathered)
            cache.index_copy_(0, dst, gathered)

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
        self.chosen_step_ends = None  # set again by _select; none for a K = 0 call
        self.chosen_draft_lens = None
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
        first_logits = self._draft_logits(hidden[sample_idx])
        if K == 0:
            return torch.empty(num_reqs, 0, dtype=torch.int64, device=hidden.device)

        req_ids = list(self._owner.input_batch.req_ids[:num_reqs]) if self._owner is not None \
            else [str(i) for i in range(num_reqs)]
        batch = self.draft_rows if self.draft_rows is not None \
            and self.draft_rows.num_rows == num_reqs else DraftRows.uniform(num_reqs)
        cand = self._candidate_rows(batch, req_ids, k, hidden.device)
        compaction = RowCompaction(cand.counts, batch.drafts_past_step, batch.needs_no_draft,
                                   greedy=batch.opted_out)
        positions = self.positions[sample_idx][:num_reqs].clone()  # position of the bonus token
        live = _LiveRows.start(self.segmenter, cand, positions.to(torch.int64)[cand.req_of_row],
                               compaction.request_of_rows())
        tokens_out = torch.zeros(cand.rows, K, dtype=torch.int64, device=hidden.device)
        logprobs_out = torch.zeros(cand.rows, K, dtype=torch.float32, device=hidden.device)
        kept = cand.starts_t.clone()  # each request's chosen row (set as requests are chosen)
        uniforms = self._draws(live, K)  # every row's draws at the K positions, hashed once
        temperature = self.specguard.specguard.draft_temperature
        token, lp = live.draft(first_logits[cand.req_of_row], uniforms, 0, temperature,
                               all_open=True)
        live.write(0, token, lp)
        length = 1
        drafted_rows = cand.rows  # row-positions sampled, the first pass's included (metrics)
        poll = StepEndPoll(hidden.device, num_reqs)
        tails = TailPoll(hidden.device) if cand.tail_stop_below is not None else None

        if K > 1:
            self.ensure_scratch(k, K)
            seq_lens = cad.seq_lens[:num_reqs].clone()
            block_table = cad.block_table_tensor[:num_reqs]
            rows = cand.rows
            cad_e = cad.replace(
                num_reqs=rows, num_actual_tokens=rows, max_query_len=1,
                query_start_loc=self.arange[: rows + 1],
                query_start_loc_cpu=torch.arange(rows + 1, dtype=torch.int32),
                seq_lens=seq_lens[cand.req_of_row],
                seq_lens_cpu_upper_bound=None if cad.seq_lens_cpu_upper_bound is None else
                cad.seq_lens_cpu_upper_bound[:num_reqs].repeat_interleave(
                    torch.tensor(cand.counts), output_size=rows),
                block_table_tensor=self._expanded_block_table(block_table, positions, cand),
                slot_mapping=self._slot_mapping_buffer[:rows],
                positions=None, is_prefilling=None, req_idx=None, dcp_local_seq_lens=None,
                logits_indices_padded=None, num_logits_indices=None,
                _num_computed_tokens_cache=None, _token_to_req_indices_cache=None,
            )
            if num_rejected_tokens_gpu is not None:
                # In the padded first pass, seq_lens count rejected slots: drop them.
                cad_e.seq_lens = cad_e.seq_lens - num_rejected_tokens_gpu[:num_reqs][cand.req_of_row]
            positions_e = positions[cand.req_of_row]
            mode, padded_rows, across_dp = self._determine_batch_execution_and_padding(rows)
            for step in range(1, K):
                # Requests whose candidates have all ended their step keep one row (the
                # chosen one, drafting on to K) or none; see row_compaction. Once only
                # tails are left every request is settled: nothing to poll or plan.
                narrowing = None
                if not compaction.all_tails:
                    done = poll.post(live)
                    narrowing = None if done is None else compaction.plan(done)
                elif tails is not None and not tails.any_going(live):
                    break  # every row left is a tail, and each has stopped (tail_min_prob)
                if narrowing is not None:
                    live.flush(tokens_out, logprobs_out)
                    local = self._settle(narrowing, compaction, live, kept, cand,
                                         tokens_out[:, :length], logprobs_out[:, :length])
                    compaction.apply(narrowing)
                    rows = compaction.total
                    if rows == 0:
                        break
                    live = live.narrowed(local, compaction.request_of_rows())
                    token, positions_e = token[local], positions_e[local]
                    cad_e = _narrow_rows(cad_e, local, narrowing.bound_rows, self.arange,
                                         self._slot_mapping_buffer)
                    mode, padded_rows, across_dp = self._determine_batch_execution_and_padding(rows)
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
                # Past its step's end a row drafts its tail greedily, as token-level SD's
                # draft does (SPECGUARD.md 4): only the step's tokens are sampled. A tail's
                # step has ended (or, SpecGuard off, has none to find): no automaton either,
                # so an all-tails position costs what one of vLLM's own SD does.
                logits = self._draft_logits(hidden[:rows])
                if compaction.all_tails:
                    if tails is None:
                        token = logits.argmax(dim=-1)
                    else:  # the tails' stop only: no draw, no automaton
                        token, _ = live.draft(logits, None, step, temperature, all_tails=True)
                    live.write(step, token, None)
                else:
                    # One launch on CUDA: the draws, the tails' stop, the step automaton.
                    token, lp = live.draft(logits, uniforms, step, temperature,
                                           all_open=poll.all_open)
                    live.write(step, token, lp)
                length = step + 1
                drafted_rows += rows

        live.flush(tokens_out, logprobs_out)
        step_ends = live.full_ends()
        self._choose_into(kept, compaction.unchosen(), tokens_out[:, :length],
                          logprobs_out[:, :length], step_ends, cand)
        chosen = self._chosen_rows(tokens_out[:, :length], step_ends, kept)
        self.chosen_draft_lens = None if cand.tail_stop_below is None \
            else live.full_kept().index_select(0, kept)
        if self.metrics is not None:
            # The first pass plus one batched pass per further position drafted.
            self.metrics.observe_draft(time.perf_counter() - started, forward_passes=length,
                                       candidate_rows=cand.rows, row_positions=drafted_rows)
        return chosen

    def _settle(self, narrowing, compaction: RowCompaction, live: _LiveRows, kept: torch.Tensor,
                cand: CandidateRows, tokens: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
        """Choose among the candidates of the requests settled now that keep a row, and
        return the indices (into the live rows) of the rows that go on drafting."""
        device = kept.device
        settled, keeps_one = rows_to_device(
            [narrowing.settled.tolist(), compaction.keeps_one.tolist()], torch.bool,
            device).unbind(0)
        self._choose_into(kept, narrowing.choose, tokens, logprobs, live.full_ends(), cand)
        req = live.req
        keep = ~settled[req] | (keeps_one[req] & (live.row_ids() == kept[req]))
        return torch.nonzero_static(keep, size=narrowing.total_after).view(-1)

    def _select(self, tokens: torch.Tensor, logprobs: torch.Tensor, step_ends: torch.Tensor,
                cand: CandidateRows) -> torch.Tensor:
        """Keep the most central candidate per request (a request with one row keeps it);
        returns ``[B, K]`` (0-padded) and sets :attr:`chosen_step_ends`."""
        index = cand.starts_t.clone()
        several = np.flatnonzero(np.asarray(cand.counts) > 1)
        self._choose_into(index, several, tokens, logprobs, step_ends, cand)
        return self._chosen_rows(tokens, step_ends, index)

    def _choose_into(self, index: torch.Tensor, requests: np.ndarray, tokens: torch.Tensor,
                     logprobs: torch.Tensor, step_ends: torch.Tensor, cand: CandidateRows) -> None:
        """Set ``index[r]`` (device) to the chosen row of each request ``r`` of ``requests``
        (host indices, k candidates each); nothing to do for none."""
        if requests.size:
            on_device = array_to_device(requests, index.device)
            index[on_device] = self._choose_among(tokens, logprobs, step_ends, cand, on_device)

    def _choose_among(self, tokens: torch.Tensor, logprobs: torch.Tensor, step_ends: torch.Tensor,
                      cand: CandidateRows, requests: torch.Tensor) -> torch.Tensor:
        """The chosen row of each of ``requests`` (k candidates each), ``[C]`` (device).

        Candidates are compared on their step part only (the whole row where no step ends
        in it), every request in one batched selector call, no host sync.
        """
        k = self.specguard.specguard.num_candidates
        width = tokens.shape[1]
        group_rows = cand.starts_t[requests].unsqueeze(1) + torch.arange(k, device=tokens.device)
        ends = step_ends[group_rows]
        lengths = torch.where(ends > 0, ends, width)
        inside = torch.arange(width, device=tokens.device) < lengths.unsqueeze(-1)
        loglik = torch.where(inside, logprobs[group_rows].double(), 0.0).sum(-1)
        best = select_candidates_batched(tokens[group_rows], lengths, loglik,
                                         self.specguard.specguard.selector)
        return group_rows.gather(1, best.unsqueeze(1)).squeeze(1)

    def _chosen_rows(self, tokens: torch.Tensor, step_ends: torch.Tensor,
                     index: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` (0-padded): the rows ``index`` of ``tokens``; sets :attr:`chosen_step_ends`."""
        out = torch.zeros(index.shape[0], self.num_speculative_tokens, dtype=torch.int64,
                          device=tokens.device)
        out[:, : tokens.shape[1]] = tokens.index_select(0, index)
        self.chosen_step_ends = step_ends.index_select(0, index)
        return out


def _narrow_rows(cad, local: torch.Tensor, bound_rows: np.ndarray, arange: torch.Tensor,
                 slot_mapping_buffer: torch.Tensor):
    """The drafting attention metadata of the rows ``local`` (device indices into the
    current rows) only.

    Each kept row keeps its block table (its scratch blocks for candidates >= 1) and
    sequence length; a request's rows share their host upper bound, so it is read at
    ``bound_rows`` (host indices of a current row of the same request, no sync)."""
    num = bound_rows.shape[0]
    bound = cad.seq_lens_cpu_upper_bound
    return cad.replace(
        num_reqs=num, num_actual_tokens=num,
        query_start_loc=arange[: num + 1],
        query_start_loc_cpu=torch.arange(num + 1, dtype=torch.int32),
        seq_lens=cad.seq_lens[local],
        seq_lens_cpu_upper_bound=None if bound is None else bound[torch.from_numpy(bound_rows)],
        block_table_tensor=cad.block_table_tensor[local],
        slot_mapping=slot_mapping_buffer[:num])


@dataclass
class _LiveRows:
    """The candidate rows still drafting (device tensors), with where each one's step ends.

    ``rows`` maps them to the call's candidate rows (None: all of them, in order); the
    step ends of rows dropped earlier are kept in ``dropped_ends``. The automaton's END is
    absorbing, so a row's step end is counted rather than tracked: ``open`` says whether
    its step is still open, ``open_pushes`` how many of its tokens left it open (the step
    ends at that count plus one). :meth:`draft` moves every field of a position on in
    place (one launch on CUDA), so the host's NumPy views of ``open`` / ``tail_open`` stay
    valid for the row set.
    """

    table: StepTable | None  # the segmenter's automaton on the rows' device (None: none)
    rows: torch.Tensor | None  # [Ra] int64: candidate row of each live row
    req: torch.Tensor  # [Ra] int64: its request
    req_host: np.ndarray  # [Ra] int64: the same, on the host
    streams: torch.Tensor  # [Ra] its random stream (row_streams)
    greedy: torch.Tensor | None  # [Ra] bool: drafted greedily (None: no such row)
    positions: torch.Tensor  # [Ra] int64: where its draws of this call start
    states: torch.Tensor  # [Ra] int64: step automaton state
    open: torch.Tensor  # [Ra] bool: its step has not ended yet
    open_pushes: torch.Tensor  # [Ra] int64: its drafted tokens that left its step open
    waits: torch.Tensor  # [Ra] bool: its request waits for this row's step to end
    request_waits: np.ndarray  # [B] bool, host: per request (see CandidateRows)
    dropped_ends: torch.Tensor  # [R] int64: step ends of every candidate row, as last flushed
    # With tail_min_prob (else None): the row's draft still grows (its tail has not stopped),
    # how many of its tokens are kept, the log-prob a tail token must reach to go on, and
    # the kept counts of every candidate row as last narrowed.
    tail_open: torch.Tensor | None = None  # [Ra] bool
    kept: torch.Tensor | None = None  # [Ra] int64
    stop_below: torch.Tensor | None = None  # [Ra] float32
    dropped_kept: torch.Tensor | None = None  # [R] int64
    # Drafted columns not yet written to the call's outputs: (position, tokens, log-probs).
    pending: list = dataclasses.field(default_factory=list)
    _open_view: np.ndarray | None = None  # ``open`` as NumPy (CPU only), made once per row set
    _tail_view: np.ndarray | None = None  # ``tail_open`` likewise

    @classmethod
    def start(cls, segmenter, cand: CandidateRows, positions: torch.Tensor,
              req_host: np.ndarray) -> _LiveRows:
        stops = cand.tail_stop_below is not None
        device = cand.open_states.device
        table = None if segmenter is None else StepTable(
            segmenter.table_on(device).view(-1), segmenter.vocab_size, segmenter.END)
        return cls(table=table, rows=None, req=cand.req_of_row,
                   req_host=req_host, streams=cand.streams, greedy=cand.greedy,
                   positions=positions, states=cand.open_states.clone(),  # moved on in place
                   open=torch.ones_like(cand.waits),
                   open_pushes=torch.zeros_like(cand.open_states), waits=cand.waits,
                   request_waits=cand.request_waits,
                   dropped_ends=torch.zeros_like(cand.open_states),
                   tail_open=torch.ones_like(cand.waits) if stops else None,
                   kept=torch.zeros_like(cand.open_states) if stops else None,
                   stop_below=cand.tail_stop_below,
                   dropped_kept=torch.zeros_like(cand.open_states) if stops else None)

    def row_state(self) -> DraftRowState:
        """The live rows' drafting state, which :meth:`draft` moves on in place."""
        return DraftRowState(open=self.open, open_pushes=self.open_pushes, states=self.states,
                             tail_open=self.tail_open, kept=self.kept, stop_below=self.stop_below)

    def draft(self, logits: torch.Tensor, uniforms: torch.Tensor | None, step: int,
              temperature: float, *, all_open: bool = False, all_tails: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The live rows' tokens and log-probs at draft position ``step`` (their logits),
        with their state moved on in place (``kernels.draft_sampling_ref.update_rows_ref``):
        a row is drawn by its keyed uniform ``uniforms[row, step]`` at ``temperature``,
        unless greedy (SpecGuard off, or past its step's end: its tail); a tail token the
        draft is unsure of stops the row (tail_min_prob); the step automaton takes the
        token. ``all_open`` / ``all_tails``: known on the host that no row's step has ended
        / every row is past it. One kernel launch on CUDA; a row's tokens, kept count and
        step end depend only on its own logits and draws."""
        return draft_position(logits, uniforms, self.greedy, self.row_state(),
                              None if all_tails else self.table, temperature=temperature,
                              u_rows=self.rows, u_col=step, all_open=all_open,
                              all_tails=all_tails)

    def tail_open_host(self) -> np.ndarray:
        """``tail_open`` on the host (CPU tensor): a NumPy view made once per row set."""
        if self._tail_view is None:
            self._tail_view = self.tail_open.numpy()
        return self._tail_view

    def full_kept(self) -> torch.Tensor:
        """``[R]``: how many tokens of every candidate row of the call are kept."""
        if self.rows is None:
            return self.kept
        return self.dropped_kept.index_copy(0, self.rows, self.kept)

    def open_host(self) -> np.ndarray:
        """``open`` on the host, for a CPU tensor: a NumPy view made once for this row set
        (:meth:`draft` updates ``open`` in place), so a poll reads it without a tensor op."""
        if self._open_view is None:
            self._open_view = self.open.numpy()
        return self._open_view

    @property
    def ends(self) -> torch.Tensor:
        """``[Ra]`` int64: each live row's step end (its length up to and including the
        delimiter; 0: not ended yet)."""
        return torch.where(self.open, 0, self.open_pushes + 1)

    def requests_done(self, num_reqs: int) -> torch.Tensor:
        """``[B]`` bool on the device: every live row of the request that waits for its
        step has ended it (a request with no live row counts as done)."""
        pending = (self.open & self.waits).to(torch.int64)
        return torch.zeros(num_reqs, dtype=torch.int64, device=pending.device) \
            .index_add_(0, self.req, pending) == 0

    def row_ids(self) -> torch.Tensor:
        if self.rows is None:
            return torch.arange(self.req.shape[0], device=self.req.device)
        return self.rows

    def full_ends(self) -> torch.Tensor:
        """``[R]``: the step end of every candidate row of the call, live or dropped."""
        if self.rows is None:
            return self.ends
        return self.dropped_ends.index_copy(0, self.rows, self.ends)

    def write(self, step: int, token: torch.Tensor, lp: torch.Tensor | None) -> None:
        """Column ``step`` of the live rows (no log-probs, None: tails only, left at 0), kept
        until :meth:`flush`: the columns of one row set are written in one op each."""
        self.pending.append((step, token, lp))

    def flush(self, tokens_out: torch.Tensor, logprobs_out: torch.Tensor) -> None:
        """Write the pending columns (consecutive positions) into the call's ``[R, K]``
        outputs; the log-probs' columns, where there are any, come first."""
        if not self.pending:
            return
        rows = slice(None) if self.rows is None else self.rows
        first = self.pending[0][0]
        tokens_out[rows, first: first + len(self.pending)] = \
            torch.stack([token for _, token, _ in self.pending], dim=1)
        lps = [lp for _, _, lp in self.pending if lp is not None]
        if lps:
            logprobs_out[rows, first: first + len(lps)] = torch.stack(lps, dim=1)
        self.pending = []

    def narrowed(self, local: torch.Tensor, req_host: np.ndarray) -> _LiveRows:
        """The live rows ``local`` only (indices into the current live rows); ``req_host``:
        their requests, which the host knows from the compaction (rows stay in order).
        Flush the pending columns first."""
        assert not self.pending, "flush the drafted columns before narrowing the rows"
        return dataclasses.replace(
            self, rows=self.row_ids()[local], req=self.req[local], req_host=req_host,
            streams=self.streams[local],
            greedy=None if self.greedy is None else self.greedy[local],
            positions=self.positions[local], states=self.states[local], open=self.open[local],
            open_pushes=self.open_pushes[local], waits=self.waits[local],
            dropped_ends=self.full_ends(), pending=[], _open_view=None, _tail_view=None,
            **({} if self.tail_open is None else dict(
                tail_open=self.tail_open[local], kept=self.kept[local],
                stop_below=self.stop_below[local], dropped_kept=self.full_kept())))
