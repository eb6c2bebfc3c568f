"""The reference decoder: SpecGuard end to end on two transformers causal LMs.

This is the oracle the in-engine plugin is tested against, decision by
decision. It is written for clarity, one request at a time, with KV caches:

  per step:  draft k candidates (one batched draft pass per token) -> select the
             most central -> one target forward over ``[last committed, d_1..d_n]``
             returning logits and the last m layers' attention -> LPBV, ABGV,
             score -> accept the step plus a bonus token, or commit the target's
             own first token and let the target finish the step.

All SpecGuard math comes from ``specguard_vllm.core``; this module only drives
the models and keeps the bookkeeping.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch

from specguard_vllm.config import SpecGuardConfig, SpecGuardParams
from specguard_vllm.core.confidence import token_logprobs
from specguard_vllm.core.decision import StepDecision, decide_steps
from specguard_vllm.core.grounding import rollout_grounding, step_attention_stats
from specguard_vllm.core.selector import select_candidate
from specguard_vllm.core.steps import StepSegmenter

Mode = Literal["specguard", "target", "draft"]
MODES: tuple[str, ...] = ("specguard", "target", "draft")


class PairMismatchError(ValueError):
    """The draft cannot serve the target (vocabulary or tokenizer differ)."""


@dataclass
class StepRecord:
    """One step of the output: its tokens, who wrote them, and how it was judged."""

    token_ids: list[int]
    text: str
    source: Literal["draft", "target"]
    decision: StepDecision | None = None
    drafted_ids: list[int] = field(default_factory=list)  # the step the target verified
    verified_context_len: int | None = None  # prompt + committed tokens it was verified after
    origins: list[str] = field(default_factory=list)  # per token: one of ORIGINS

    def to_json(self) -> dict:
        d = self.decision
        return {
            "text": self.text,
            "source": self.source,
            "lpbv": None if d is None else d.lpbv,
            "abgv": None if d is None else d.abgv,
            "score": None if d is None else d.score,
            "accepted": None if d is None else d.accepted,
            "tokens": origin_counts(self.origins),
        }


# Where a committed token came from: an accepted step ("step"), the prefix of a rejected
# step kept by token-level verification ("prefix"), a draft accepted by token-level SD
# while finishing a step or in an accepted step's tail ("sd"), or the target itself.
ORIGINS = ("step", "prefix", "sd", "target")


def origin_counts(origins: Sequence[str]) -> dict[str, int]:
    return {name: sum(1 for o in origins if o == name) for name in ORIGINS}


@dataclass
class DecodeResult:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    steps: list[StepRecord]
    finish_reason: Literal["stop", "length"]
    target_forwards: int = 0
    draft_forwards: int = 0

    @property
    def steps_accepted(self) -> int:
        return sum(1 for s in self.steps if s.decision is not None and s.decision.accepted)

    @property
    def steps_rejected(self) -> int:
        return sum(1 for s in self.steps if s.decision is not None and not s.decision.accepted)


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a causal LM with eager attention, so attention probabilities are returned."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="eager")
    model.eval()
    return model


def check_pair(target, draft, target_tokenizer=None, draft_tokenizer=None) -> None:
    """Refuse a draft whose vocabulary or tokenizer does not match the target's."""
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise PairMismatchError(
            f"draft vocabulary size {dv} does not match the target's {tv}: "
            "the draft must share the target's tokenizer"
        )
    if target_tokenizer is not None and draft_tokenizer is not None:
        tvocab, dvocab = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
        if tvocab != dvocab:
            raise PairMismatchError(
                f"draft tokenizer ({len(dvocab)} tokens) differs from the target's "
                f"({len(tvocab)} tokens): the draft must share the target's tokenizer"
            )


def context_limit(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048))


def token_level_verify(logits: torch.Tensor, drafted: list[int], temperature: float,
                       generator: torch.Generator) -> list[int]:
    """Standard (lossless) speculative verification of ``drafted`` on the target's logits.

    ``logits`` is ``[n + 1, V]`` from the verification pass. Greedy: the longest prefix equal
    to the target's argmax, then the target's own token. Sampling: accept ``d_t`` with
    probability ``p(d_t)`` (the proposal is treated as deterministic), else sample from
    ``p`` with ``d_t`` removed. All accepted: the bonus token from the last row.
    """
    out: list[int] = []
    for t, token in enumerate(drafted):
        row = logits[t].float()
        if temperature == 0.0:
            target_token = int(row.argmax())
            out.append(target_token)
            if target_token != token:
                return out
            continue
        probs = torch.softmax(row / temperature, dim=-1)
        if float(torch.rand((), generator=generator)) < float(probs[token]):
            out.append(token)
            continue
        residual = probs.clone()
        residual[token] = 0.0
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
        return out
    out.append(int(_sample(logits[len(drafted):len(drafted) + 1].float(), temperature, generator)[0]))
    return out


def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """Greedy at temperature 0, else a seeded multinomial draw; ``[R, V] -> [R]``."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class ReferenceDecoder:
    """SpecGuard, target-only and draft-only decoding on transformers models."""

    def __init__(self, target, draft, tokenizer, config: SpecGuardConfig, draft_tokenizer=None):
        check_pair(target, draft, tokenizer, draft_tokenizer)
        self.target = target
        self.draft = draft
        self.tokenizer = tokenizer
        self.config = config
        num_layers = target.config.num_hidden_layers
        if config.specguard.grounding_layers > num_layers:
            raise ValueError(
                f"specguard.grounding_layers is {config.specguard.grounding_layers} but the target "
                f"has only {num_layers} layers"
            )
        self.segmenter = StepSegmenter.from_tokenizer(
            tokenizer, config.specguard.step_delimiters, vocab_size=target.config.vocab_size
        )
        self.eos_token_ids = self._eos_ids()
        self.max_context = min(context_limit(target), context_limit(draft))

    @classmethod
    def from_paths(cls, target_path, config: SpecGuardConfig, dtype=torch.float32):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(target_path))
        draft_tokenizer = None
        if (Path(config.model) / "tokenizer.json").exists() or (
            Path(config.model) / "tokenizer_config.json"
        ).exists():
            draft_tokenizer = AutoTokenizer.from_pretrained(config.model)
        target = load_causal_lm(target_path, dtype)
        draft = load_causal_lm(config.model, dtype)
        return cls(target, draft, tokenizer, config, draft_tokenizer)

    def _eos_ids(self) -> frozenset[int]:
        ids = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.target.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(x) for x in source)
        return frozenset(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ------------------------------------------------------------------ model passes

    @torch.inference_mode()
    def _forward(self, model, input_ids: list[int] | torch.Tensor, cache, attentions: bool = False):
        ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor([input_ids])
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, output_attentions=attentions)
        return out

    def _verify(self, cache, last_token: int, row: list[int], context_len: int,
                params: SpecGuardParams, step_len: int | None = None):
        """One target forward over ``[last committed, d_1..d_n]``: logits + decision.

        The decision judges the first ``step_len`` drafted tokens (default: all of them);
        the rest of the row is a tail that only token-level verification looks at.
        """
        out = self._forward(self.target, [last_token] + row, cache, attentions=True)
        logits = out.logits[0].float()  # [n + 1, V]
        step_len = len(row) if step_len is None else step_len
        decision = None
        if step_len > 0:
            decision = self._decision(logits, out.attentions, row[:step_len], context_len, params,
                                      tail=len(row) - step_len)
        return logits, decision

    def _decision(self, logits, attentions, step, context_len, params: SpecGuardParams,
                  tail: int = 0) -> StepDecision:
        n = len(step)
        lp = token_logprobs(logits[:n], torch.tensor(step))
        l_min = lp.min()
        m = params.grounding_layers
        prefix_masses, blocks = [], []
        for layer_attn in attentions[-m:]:
            rows = layer_attn[0, :, -(n + tail):, :]
            # Step rows d_1..d_n over the context and the step's keys (causal: a step row
            # puts no mass on the tail after it).
            probs = rows[:, :n, : context_len + n].float()
            pm, blk = step_attention_stats(probs, context_len, params.attention_sparsity)
            prefix_masses.append(pm)
            blocks.append(blk)
        g = rollout_grounding(torch.stack(prefix_masses), torch.stack(blocks))
        g_min = g.min()
        score, accepted = decide_steps(
            l_min.unsqueeze(0), g_min.unsqueeze(0), tau=params.tau, beta=params.beta,
            lpbv_floor=params.lpbv_floor,
        )
        return StepDecision(float(l_min), float(g_min), float(score[0]), bool(accepted[0]))

    @torch.inference_mode()
    def score_step(self, context_ids: Sequence[int], step_ids: Sequence[int],
                   params: SpecGuardParams | None = None) -> StepDecision:
        """Verify one given step after a given context, from scratch (no cache).

        The differential tests use this to re-score every step the vLLM engine took.
        """
        params = params or self.config.specguard
        context, step = list(context_ids), list(step_ids)
        if not context or not step:
            raise ValueError("score_step needs a non-empty context and step")
        out = self._forward(self.target, context + step, None, attentions=True)
        logits = out.logits[0, len(context) - 1:].float()
        return self._decision(logits, out.attentions, step, len(context), params)

    def _draft_candidates(self, draft_cache, pending: list[int], step_prefix: list[int], k: int,
                          temperature: float, max_len: int, generator: torch.Generator,
                          full_rows: bool = False):
        """k candidate steps from one batched draft pass per token.

        ``pending`` are committed tokens the draft cache has not seen yet (at least
        the last one). With ``full_rows`` every candidate runs on past its step's end
        to ``max_len`` tokens (or an EOS), as the engine drafts for ``fallback:
        speculative``. Returns (candidates, step lengths, step log-likelihoods, draft
        forwards used).
        """
        out = self._forward(self.draft, pending, draft_cache)
        forwards = 1
        logits = out.logits[0, -1:].float().expand(k, -1)
        cache = copy.deepcopy(draft_cache)
        if k > 1:
            cache.batch_repeat_interleave(k)
        candidates: list[list[int]] = [[] for _ in range(k)]
        step_lens: list[int | None] = [None] * k
        loglik = [0.0] * k
        done = [False] * k
        for position in range(max_len):
            tokens = _sample(logits, temperature, generator)
            logprobs = torch.log_softmax(logits, dim=-1)
            for c in range(k):
                if done[c]:
                    continue
                token = int(tokens[c])
                candidates[c].append(token)
                if step_lens[c] is None:
                    loglik[c] += float(logprobs[c, token])
                    if self.segmenter.step_length(candidates[c], prefix=step_prefix) is not None:
                        step_lens[c] = len(candidates[c])
                if token in self.eos_token_ids or (step_lens[c] is not None and not full_rows):
                    done[c] = True
            if all(done) or position == max_len - 1:
                break
            out = self._forward(self.draft, tokens.view(k, 1), cache)
            forwards += 1
            logits = out.logits[:, -1].float()
        lengths = [len(cand) if n is None else n for cand, n in zip(candidates, step_lens)]
        return candidates, lengths, loglik, forwards

    # ------------------------------------------------------------------ the loop

    def check_prompt(self, prompt_ids: Sequence[int]) -> None:
        if len(prompt_ids) == 0:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_context:
            raise ValueError(
                f"prompt has {len(prompt_ids)} tokens but the models' context is "
                f"{self.max_context} tokens (target {context_limit(self.target)}, "
                f"draft {context_limit(self.draft)})"
            )

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        mode: Mode = "specguard",
        max_tokens: int = 256,
        temperature: float = 0.0,
        seed: int = 0,
        params: SpecGuardParams | None = None,
    ) -> DecodeResult:
        """Decode one prompt; ``temperature`` is the target's sampling temperature."""
        from transformers import DynamicCache

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        params = params or self.config.specguard
        prompt = list(prompt_ids)
        self.check_prompt(prompt)
        target_gen = torch.Generator().manual_seed(seed)
        draft_gen = torch.Generator().manual_seed(params.seed if params.seed is not None else seed)

        committed = list(prompt)
        generated: list[int] = []
        steps: list[StepRecord] = []
        step_tokens: list[int] = []  # committed tokens of the open step
        step_origins: list[str] = []  # their origins (ORIGINS)
        pending_decision: StepDecision | None = None
        pending_draft: list[int] = []
        pending_context_len: int | None = None
        regenerating = False
        token_level = False  # finishing a rejected step with token-level SD (fallback: speculative)
        full_rows = params.fallback == "speculative"  # draft past the step, verify the tail
        counters = {"target": 0, "draft": 0}

        target_cache = DynamicCache()
        draft_cache = DynamicCache()
        draft_seen = 0  # committed tokens already in the draft cache
        if len(prompt) > 1 and mode != "draft":
            self._forward(self.target, prompt[:-1], target_cache)

        def close_step(source: str) -> None:
            nonlocal step_tokens, step_origins, pending_decision, pending_draft, pending_context_len
            if step_tokens:
                steps.append(StepRecord(list(step_tokens), self.decode(step_tokens), source,
                                        pending_decision, list(pending_draft), pending_context_len,
                                        list(step_origins)))
            step_tokens, step_origins, pending_decision, pending_draft = [], [], None, []
            pending_context_len = None

        def commit(tokens: list[int], origin: str = "target") -> bool:
            """Append tokens (up to max_tokens / EOS / context); True when generation ends."""
            for token in tokens:
                committed.append(token)
                generated.append(token)
                step_tokens.append(token)
                step_origins.append(origin)
                if token in self.eos_token_ids or len(generated) >= max_tokens \
                        or len(committed) >= self.max_context:
                    return True
            return False

        def commit_verified(kept: list[int], draft_origin: str) -> bool:
            """Commit what token-level verification kept (drafts, then the target's token),
            closing a step at every delimiter; True when generation ends."""
            nonlocal token_level
            for j, token in enumerate(kept):
                finished = commit([token], draft_origin if j < len(kept) - 1 else "target")
                if self.segmenter.step_length([token], prefix=step_tokens[:-1]) is not None:
                    close_step("target")
                    token_level = False
                if finished:
                    return True
            return False

        def target_step(source: str) -> bool:
            """Target (or draft, in draft mode) writes one token; closes the step at a delimiter."""
            nonlocal draft_seen
            if source == "draft":
                out = self._forward(self.draft, committed[draft_seen:], draft_cache)
                draft_seen = len(committed)
                counters["draft"] += 1
            else:
                out = self._forward(self.target, [committed[-1]], target_cache)
                counters["target"] += 1
            token = int(_sample(out.logits[0, -1:].float(), temperature, target_gen)[0])
            finished = commit([token], "target")
            if self.segmenter.step_length(step_tokens[-1:], prefix=step_tokens[:-1]) is not None:
                close_step(source)
                return finished or False
            return finished

        def crop_target(keep: int) -> None:
            surplus = target_cache.get_seq_length() - keep
            if surplus > 0:
                target_cache.crop(-surplus)

        # As in vLLM, the prefill pass of the target emits the first token itself;
        # drafting starts after it. (In draft mode the draft does the prefill.)
        finished = target_step("draft" if mode == "draft" else "target")
        while not finished:
            if mode == "target" or (mode == "specguard" and regenerating):
                finished = target_step("target")
                if not step_tokens:
                    regenerating = False
                continue
            if mode == "draft":
                finished = target_step("draft")
                continue

            room = self.max_context - len(committed) - 1
            max_len = min(self.config.num_speculative_tokens, room)
            if max_len < 1:
                finished = target_step("target")
                continue
            candidates, step_lens, loglik, draft_forwards = self._draft_candidates(
                draft_cache, committed[draft_seen:], step_tokens, params.num_candidates,
                params.draft_temperature, max_len, draft_gen, full_rows=full_rows,
            )
            draft_seen = len(committed)
            counters["draft"] += draft_forwards
            best = select_candidate([c[:n] for c, n in zip(candidates, step_lens)], loglik,
                                    params.selector)
            row, step_len = candidates[best], step_lens[best]

            context_len = len(committed)
            logits, decision = self._verify(target_cache, committed[-1], row, context_len, params,
                                            step_len=0 if token_level else step_len)
            counters["target"] += 1
            if token_level:
                # Finishing a rejected step: the whole row is verified token-level.
                kept = token_level_verify(logits, row, temperature, target_gen)
                crop_target(context_len + len(kept) - 1)
                finished = commit_verified(kept, "sd")
                continue
            pending_decision, pending_draft = decision, list(row[:step_len])
            pending_context_len = context_len
            if not decision.accepted and params.fallback == "speculative":
                # Keep what token-level verification accepts, plus its recovered/bonus token;
                # finish the step token-level.
                kept = token_level_verify(logits, row, temperature, target_gen)
                crop_target(context_len + len(kept) - 1)
                token_level = True
                finished = commit_verified(kept, "prefix")
                continue
            if decision.accepted:
                finished = commit(row[:step_len], "step")
                close_step("draft")
                if finished:
                    break
                # The tail (empty without full rows) is verified token-level after the step.
                kept = token_level_verify(logits[step_len:], row[step_len:], temperature, target_gen)
                crop_target(context_len + step_len + len(kept) - 1)
                finished = commit_verified(kept, "sd")
            else:
                crop_target(context_len)  # drop the rejected step's keys
                first = int(_sample(logits[:1], temperature, target_gen)[0])
                finished = commit([first], "target")
                if self.segmenter.step_length(step_tokens[-1:], prefix=step_tokens[:-1]) is not None:
                    close_step("target")
                else:
                    regenerating = True
        close_step("target" if mode != "draft" else "draft")

        last = generated[-1] if generated else None
        reason = "stop" if last in self.eos_token_ids else "length"
        return DecodeResult(prompt, generated, self.decode(generated), steps, reason,
                            counters["target"], counters["draft"])
