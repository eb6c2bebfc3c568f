"""The reference decoder: SpecGuard end to end on two transformers causal LMs.

This is the oracle the in-engine plugin is tested against, decision by decision
and token by token, so it is written to be read: one request at a time, with KV
caches, the loop of SPECGUARD.md section 2 in ``ReferenceDecoder.generate`` and
one method per part of it (draft candidates, select the central one, verify and
score the step, accept it or recover from it). All SpecGuard math comes from
``specguard_vllm.core``; this module only drives the models and keeps the books.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Literal

import torch

from specguard_vllm.config import SpecGuardConfig, SpecGuardParams
from specguard_vllm.core.confidence import token_logprobs
from specguard_vllm.core.decision import StepDecision, decide_steps
from specguard_vllm.core.grounding import rollout_grounding, step_attention_stats
from specguard_vllm.core.selector import select_candidate
from specguard_vllm.core.steps import StepSegmenter

Mode = Literal["specguard", "target", "draft"]
MODES: tuple[str, ...] = ("specguard", "target", "draft")

# Where a committed token came from: an accepted step ("step"), the prefix of a rejected
# step kept by token-level verification ("prefix"), a draft accepted by token-level SD
# while finishing a step or in an accepted step's tail ("sd"), or the target itself.
ORIGINS = ("step", "prefix", "sd", "target")


TokenMask = Callable[[Sequence[int]], "torch.Tensor | None"]
"""A request's constraints for the reference decoder: given the tokens generated so far (the
preceding drafts included), a ``[V]`` bool mask of the tokens the next position forbids (None:
none). The target's distribution is masked with it wherever the target samples or verifies,
as vLLM masks its processed distribution (SPECGUARD.md 2.6)."""


@dataclass(frozen=True)
class RequestConstraints:
    """The request constraints the reference can express, as vLLM applies them: ``bad_words``
    (token-id sequences, matched against the generated tokens only, as vLLM does),
    ``allowed_token_ids``, and ``min_tokens`` (its ``stop_token_ids``, EOS included, are
    forbidden until that many tokens were generated). Grammars are engine-only."""

    vocab_size: int
    bad_words: tuple[tuple[int, ...], ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def __call__(self, generated: Sequence[int]) -> torch.Tensor:
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        if self.allowed_token_ids is not None:
            mask[:] = True
            mask[list(self.allowed_token_ids)] = False
        for word in self.bad_words:
            prefix = list(word[:-1])
            if len(prefix) <= len(generated) and list(generated[len(generated) - len(prefix):]) == prefix:
                mask[word[-1]] = True
        if len(generated) < self.min_tokens:
            mask[list(self.stop_token_ids)] = True
        return mask


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


class StepMode(Enum):
    """Who writes the rest of the open step (SPECGUARD.md sections 2.5 and 4)."""

    DRAFT = "draft"  # the draft proposes the step and the target judges it
    REGENERATE = "regenerate"  # rejected, `fallback: target`: the target, one token a pass
    TOKEN_LEVEL = "token_level"  # rejected, `fallback: speculative`: token-level SD


@dataclass
class Candidates:
    """The k drafted rows; a row's first ``step_lens[c]`` tokens are its step, the rest its tail."""

    rows: list[list[int]]
    step_lens: list[int]
    loglik: list[float]  # each step's draft log-likelihood, the selector's tie-break

    def central(self, selector: str) -> tuple[list[int], int]:
        """The row whose step is most similar to the other steps, and its step length."""
        steps = [row[:n] for row, n in zip(self.rows, self.step_lens)]
        best = select_candidate(steps, self.loglik, selector)
        return self.rows[best], self.step_lens[best]


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
        generation_eos = getattr(self.target.generation_config, "eos_token_id", None)
        for source in (self.tokenizer.eos_token_id, generation_eos):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(x) for x in source)
        return frozenset(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def check_prompt(self, prompt_ids: Sequence[int]) -> None:
        if len(prompt_ids) == 0:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_context:
            raise ValueError(
                f"prompt has {len(prompt_ids)} tokens but the models' context is "
                f"{self.max_context} tokens (target {context_limit(self.target)}, "
                f"draft {context_limit(self.draft)})"
            )

    # ------------------------------------------------------------------ the loop

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
        constraints: TokenMask | None = None,
        max_scheduled_drafts: int | None = None,
    ) -> DecodeResult:
        """Decode one prompt; ``temperature`` is the target's sampling temperature.

        ``constraints`` masks the target's distribution (SPECGUARD.md 2.6: no committed token
        is one it forbids; an accepted step is cut before its first forbidden token).
        ``max_scheduled_drafts`` is the most drafts one verification takes, as vLLM's scheduler
        truncates rows to its token budget (``--max-num-batched-tokens``, less the slots it keeps
        for drafting); a step longer than that is verified token-level and stays open.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        params = params or self.config.specguard
        self.check_prompt(prompt_ids)
        req = _Request(self, prompt_ids, max_tokens, temperature, seed, params, constraints)
        writer = "draft" if mode == "draft" else "target"  # who writes a token a pass
        if len(req.prompt) > 1 and writer == "target":
            self._forward(self.target, req.prompt[:-1], req.target_cache)
        # As in vLLM, the prefill pass emits the first token itself; drafting starts after it.
        finished = self._write_token(req, writer)
        while not finished:
            max_len = min(self.config.num_speculative_tokens, req.draft_room())
            if mode != "specguard" or req.step_mode is StepMode.REGENERATE or max_len < 1:
                finished = self._write_token(req, writer)
                continue
            candidates = self._draft_candidates(req, params, max_len)  # 1. draft k candidates
            row, step_len = candidates.central(params.selector)  # 2. select the central one
            truncated = self._truncated(req, row, step_len, max_scheduled_drafts)
            row = row[:max_scheduled_drafts]  # what the scheduler lets one pass verify
            logits, attentions = self._verification_pass(req, row)  # 3. verify: one target pass
            if req.step_mode is StepMode.TOKEN_LEVEL or truncated:  # not a whole step
                finished = self._token_level(req, logits, row, "sd")
                continue
            context_len = len(req.committed)
            decision = _judge(logits, attentions, row, step_len, context_len, params)  # 4. score
            req.step.judged(decision, row[:step_len], context_len)
            if decision.accepted:  # 5. decide
                finished = self._accept(req, logits, row, step_len)
            elif params.fallback == "speculative":
                finished = self._speculative_fallback(req, logits, row)
            else:
                finished = self._regenerate(req, logits)
        req.close_step(writer)
        return req.result()

    # ------------------------------------------------------------------ the step's parts

    def _draft_candidates(self, req: _Request, params: SpecGuardParams, max_len: int) -> Candidates:
        """k candidate steps from one batched draft pass per token (SPECGUARD.md 2.1).

        A candidate stops at its step's end, or with ``fallback: speculative`` runs on past it
        to ``max_len`` tokens, greedily, as the engine drafts (section 4: only the step's
        tokens are sampled at draft_temperature), its tail ending after the first token the
        draft gives a probability below ``tail_min_prob``; an EOS stops it either way.
        """
        k, temperature = params.num_candidates, params.draft_temperature
        full_rows = params.fallback == "speculative"
        stop_below = math.log(params.tail_min_prob) if params.tail_min_prob > 0.0 else -math.inf
        logits = self._draft_catch_up(req).logits[0, -1:].float().expand(k, -1)
        cache = copy.deepcopy(req.draft_cache)  # the candidates' keys never enter the draft cache
        if k > 1:
            cache.batch_repeat_interleave(k)
        rows: list[list[int]] = [[] for _ in range(k)]
        step_lens: list[int | None] = [None] * k
        loglik = [0.0] * k
        done = [False] * k
        for position in range(max_len):
            tokens = _sample(logits, temperature, req.draft_gen)
            past_step = torch.tensor([n is not None for n in step_lens])
            tokens = torch.where(past_step, logits.argmax(dim=-1), tokens)  # tails: greedy
            logprobs = torch.log_softmax(logits, dim=-1)
            for c in range(k):
                if done[c]:
                    continue
                token = int(tokens[c])
                rows[c].append(token)
                in_tail = step_lens[c] is not None
                if not in_tail:
                    loglik[c] += float(logprobs[c, token])
                    if self.segmenter.step_length(rows[c], prefix=req.step.tokens) is not None:
                        step_lens[c] = len(rows[c])
                if token in self.eos_token_ids or (step_lens[c] is not None and not full_rows):
                    done[c] = True
                if in_tail and float(logprobs[c, token]) < stop_below:
                    done[c] = True  # an unsure tail token: kept, and the tail ends there
            if all(done) or position == max_len - 1:
                break
            out = self._forward(self.draft, tokens.view(k, 1), cache)
            req.draft_forwards += 1
            logits = out.logits[:, -1].float()
        lengths = [len(row) if n is None else n for row, n in zip(rows, step_lens)]
        return Candidates(rows, lengths, loglik)

    def _truncated(self, req: _Request, row: list[int], step_len: int, budget: int | None) -> bool:
        """Whether the scheduler would verify less than the whole step: a step longer than the
        budget, or cut by the context's end before its delimiter (the engine drafts up to K
        tokens there and its scheduler cuts the row at ``max_model_len``)."""
        if budget is not None and step_len > budget:
            return True
        cut_by_context = len(row) == step_len < self.config.num_speculative_tokens
        return cut_by_context and self.segmenter.step_length(row, prefix=req.step.tokens) is None

    def _verification_pass(self, req: _Request, row: list[int]):
        """The target's one forward over ``[last committed, d_1..d_n]``: ``[n + 1, V]`` logits
        (row t predicts d_{t+1}; the last, the bonus token) and every layer's attention."""
        ids = req.committed[-1:] + row
        out = self._forward(self.target, ids, req.target_cache, attentions=True)
        req.target_forwards += 1
        return out.logits[0].float(), out.attentions

    def _accept(self, req: _Request, logits: torch.Tensor, row: list[int], step_len: int) -> bool:
        """Commit the step up to its first forbidden token (the whole step if none), then verify
        the rest of the row token-level: the tail (an empty tail: the bonus), or, after a cut,
        the forbidden token, which is rejected for the target's own token (SPECGUARD.md 2.6)."""
        cut = req.first_forbidden(row, step_len)
        finished = req.commit(row[:cut], "step")
        req.close_step("draft")
        return finished or self._token_level(req, logits[cut:], row[cut:], "sd")

    def _speculative_fallback(self, req: _Request, logits: torch.Tensor, row: list[int]) -> bool:
        """`fallback: speculative`: keep the row's prefix that token-level SD accepts, plus the
        recovered token, and finish the step token-level (SPECGUARD.md section 4)."""
        req.step_mode = StepMode.TOKEN_LEVEL
        return self._token_level(req, logits, row, "prefix")

    def _regenerate(self, req: _Request, logits: torch.Tensor) -> bool:
        """`fallback: target` (the paper's): drop the step, commit the target's own token at its
        first position, and let the target write the rest one token a pass."""
        req.crop_target(len(req.committed))
        first = int(_sample(req.constrain(logits[:1]), req.temperature, req.target_gen)[0])
        req.step_mode = StepMode.REGENERATE
        return req.commit_kept([first], "target")

    def _token_level(self, req: _Request, logits: torch.Tensor, drafted: list[int],
                     draft_origin: str) -> bool:
        """Lossless token-level SD of ``drafted`` on the pass's logits: commit the drafts it keeps
        (as ``draft_origin``) and its recovered or bonus token; drop the rest's keys."""
        kept = token_level_verify(req.constrain(logits, drafted), drafted, req.temperature,
                                  req.target_gen)
        req.crop_target(len(req.committed) + len(kept) - 1)
        return req.commit_kept(kept, draft_origin)

    def _write_token(self, req: _Request, writer: Literal["target", "draft"]) -> bool:
        """One pass of ``writer``, one sampled token: target-only and draft-only decoding, the
        first token, and a step the target regenerates."""
        if writer == "draft":
            out = self._draft_catch_up(req)
        else:
            out = self._forward(self.target, req.committed[-1:], req.target_cache)
            req.target_forwards += 1
        logits = req.constrain(out.logits[0, -1:].float())
        token = int(_sample(logits, req.temperature, req.target_gen)[0])
        return req.commit_kept([token], "target", source=writer)

    def _draft_catch_up(self, req: _Request):
        """The draft's pass over the committed tokens its cache lacks (at least the last one)."""
        out = self._forward(self.draft, req.committed[req.draft_seen:], req.draft_cache)
        req.draft_seen = len(req.committed)
        req.draft_forwards += 1
        return out

    @torch.inference_mode()
    def _forward(self, model, input_ids: list[int] | torch.Tensor, cache, attentions: bool = False):
        ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor([input_ids])
        return model(input_ids=ids, past_key_values=cache, use_cache=True,
                     output_attentions=attentions)

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
        return _judge(logits, out.attentions, step, len(step), len(context), params)


# ---------------------------------------------------------------------- one request's books


@dataclass
class _OpenStep:
    """The step being written: its committed tokens so far and, once judged, its verdict."""

    tokens: list[int] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)
    decision: StepDecision | None = None
    drafted: list[int] = field(default_factory=list)
    context_len: int | None = None

    def judged(self, decision: StepDecision, drafted: list[int], context_len: int) -> None:
        self.decision, self.drafted, self.context_len = decision, drafted, context_len


class _Request:
    """One request's state: committed tokens, closed step records, the open step, both KV
    caches (the target's holds every committed token but the last) and the seeded RNGs."""

    def __init__(self, decoder: ReferenceDecoder, prompt_ids: Sequence[int], max_tokens: int,
                 temperature: float, seed: int, params: SpecGuardParams,
                 constraints: TokenMask | None = None):
        from transformers import DynamicCache

        self.decoder = decoder
        self.prompt = list(prompt_ids)
        self.committed = list(self.prompt)
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.target_gen = torch.Generator().manual_seed(seed)
        draft_seed = params.seed if params.seed is not None else seed
        self.draft_gen = torch.Generator().manual_seed(draft_seed)
        self.target_cache = DynamicCache()
        self.draft_cache = DynamicCache()
        self.draft_seen = 0  # committed tokens already in the draft cache
        self.target_forwards = 0
        self.draft_forwards = 0
        self.steps: list[StepRecord] = []
        self.step = _OpenStep()
        self.step_mode = StepMode.DRAFT
        self.constraints = constraints

    @property
    def generated(self) -> list[int]:
        return self.committed[len(self.prompt):]

    def constrain(self, logits: torch.Tensor, drafted: Sequence[int] = ()) -> torch.Tensor:
        """``logits`` ``[R, V]`` with what the constraints forbid at -inf; row t follows the
        generated tokens and ``drafted[:t]``."""
        if self.constraints is None:
            return logits
        rows = []
        for t in range(logits.shape[0]):
            mask = self.constraints(self.generated + list(drafted[:t]))
            rows.append(logits[t] if mask is None else logits[t].masked_fill(mask, float("-inf")))
        return torch.stack(rows)

    def first_forbidden(self, row: list[int], step_len: int) -> int:
        """The first of the step's positions whose draft the constraints forbid, else its length."""
        if self.constraints is not None:
            for t in range(step_len):
                mask = self.constraints(self.generated + row[:t])
                if mask is not None and bool(mask[row[t]]):
                    return t
        return step_len

    def draft_room(self) -> int:
        """The most tokens a drafted row may have: it and the bonus token must fit the context."""
        return self.decoder.max_context - len(self.committed) - 1

    def commit(self, tokens: list[int], origin: str) -> bool:
        """Append tokens to the open step; True (and stop) at EOS, max_tokens or the context."""
        d = self.decoder
        for token in tokens:
            self.committed.append(token)
            self.step.tokens.append(token)
            self.step.origins.append(origin)
            if token in d.eos_token_ids or len(self.committed) >= d.max_context \
                    or len(self.committed) - len(self.prompt) >= self.max_tokens:
                return True
        return False

    def commit_kept(self, kept: list[int], draft_origin: str, source: str = "target") -> bool:
        """Commit what a verification kept: drafts (``draft_origin``), then the model's own token,
        closing the open step at every step end; True when decoding ends."""
        for j, token in enumerate(kept):
            finished = self.commit([token], draft_origin if j < len(kept) - 1 else "target")
            ends_step = self.decoder.segmenter.step_length([token], prefix=self.step.tokens[:-1])
            if ends_step is not None:
                self.close_step(source)
            if finished:
                return True
        return False

    def close_step(self, source: str) -> None:
        """Record the open step (if it has tokens) and open the next, drafted again."""
        s = self.step
        if s.tokens:
            self.steps.append(StepRecord(s.tokens, self.decoder.decode(s.tokens), source,
                                         s.decision, s.drafted, s.context_len, s.origins))
        self.step = _OpenStep()
        self.step_mode = StepMode.DRAFT

    def crop_target(self, keep: int) -> None:
        """Drop the target's cached keys past the first ``keep`` (drafts it did not keep)."""
        surplus = self.target_cache.get_seq_length() - keep
        if surplus > 0:
            self.target_cache.crop(-surplus)

    def result(self) -> DecodeResult:
        generated = self.generated
        last = generated[-1] if generated else None
        reason = "stop" if last in self.decoder.eos_token_ids else "length"
        return DecodeResult(self.prompt, generated, self.decoder.decode(generated), self.steps,
                            reason, self.target_forwards, self.draft_forwards)


# ---------------------------------------------------------------------- the step's verdict


def _judge(logits: torch.Tensor, attentions, row: list[int], step_len: int, context_len: int,
           params: SpecGuardParams) -> StepDecision:
    """Score the row's first ``step_len`` tokens and decide (SPECGUARD.md 2.3-2.5).

    Rollout and LPBV are causal, so the tail after the step changes neither.
    """
    step = row[:step_len]
    l_min = _confidence(logits, step)
    g_min = _grounding(attentions, step_len, len(row) - step_len, context_len, params)
    score, accepted = decide_steps(l_min.unsqueeze(0), g_min.unsqueeze(0), tau=params.tau,
                                   beta=params.beta, lpbv_floor=params.lpbv_floor)
    return StepDecision(float(l_min), float(g_min), float(score[0]), bool(accepted[0]))


def _confidence(logits: torch.Tensor, step: list[int]) -> torch.Tensor:
    """LPBV's L_min: the target's log-prob of the step's least likely token."""
    return token_logprobs(logits[: len(step)], torch.tensor(step)).min()


def _grounding(attentions, step_len: int, tail: int, context_len: int,
               params: SpecGuardParams) -> torch.Tensor:
    """ABGV's G_min: the least grounded step token after rolling out the last m layers."""
    prefix_masses, blocks = [], []
    for layer_attn in attentions[-params.grounding_layers:]:
        rows = layer_attn[0, :, -(step_len + tail):, :]
        # Step rows d_1..d_n over the context and the step's keys (causal: a step row puts
        # no mass on the tail after it).
        probs = rows[:, :step_len, : context_len + step_len].float()
        mass, block = step_attention_stats(probs, context_len, params.attention_sparsity)
        prefix_masses.append(mass)
        blocks.append(block)
    return rollout_grounding(torch.stack(prefix_masses), torch.stack(blocks)).min()


# ---------------------------------------------------------------------- models and sampling


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a causal LM with eager attention, so attention probabilities are returned."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype,
                                                 attn_implementation="eager")
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
    bonus = logits[len(drafted):len(drafted) + 1].float()
    out.append(int(_sample(bonus, temperature, generator)[0]))
    return out


def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """Greedy at temperature 0, else a seeded multinomial draw; ``[R, V] -> [R]``."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
