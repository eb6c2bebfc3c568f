"""Reference decoder invariants on tiny Llama models built inside the tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specguard_vllm.config import SpecGuardConfig
from specguard_vllm.reference import PairMismatchError, ReferenceDecoder

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a = 3\nb = ", "c = 7\nd = c + 2\n", "e = 1\n", "answer", "f = 4\ng = f + 5\nh = "]


def make_config(draft: Path, **specguard) -> SpecGuardConfig:
    return SpecGuardConfig.model_validate(
        {"method": "specguard", "model": str(draft), "num_speculative_tokens": 8,
         "specguard": {"seed": 0, **specguard}}
    )


@pytest.fixture(scope="module")
def decoder(tiny_pair):
    return ReferenceDecoder.from_paths(tiny_pair["target"], make_config(tiny_pair["draft"]))


def encode(decoder, text):
    return decoder.tokenizer(text)["input_ids"]


@pytest.mark.parametrize("fallback", ["target", "speculative"])
def test_tau_above_one_gives_exactly_target_only_greedy_text(decoder, fallback):
    params = decoder.config.specguard.model_copy(update={"tau": 1.01, "fallback": fallback})
    for prompt in PROMPTS:
        ids = encode(decoder, prompt)
        target_only = decoder.generate(ids, mode="target", max_tokens=40)
        guarded = decoder.generate(ids, mode="specguard", max_tokens=40, params=params)
        assert guarded.token_ids == target_only.token_ids, prompt
        assert all(step.source == "target" for step in guarded.steps)
        assert all(step.decision is None or not step.decision.accepted for step in guarded.steps)
        if fallback == "target":  # every step is drafted, judged and rejected
            assert all(step.decision is not None for step in guarded.steps)
        else:  # steps reached inside a token-level commit are not judged; the others are
            assert any(step.decision is not None for step in guarded.steps)


def test_tau_zero_accepts_every_verified_step(decoder):
    params = decoder.config.specguard.model_copy(update={"tau": 0.0})
    total = 0
    for prompt in PROMPTS:
        result = decoder.generate(encode(decoder, prompt), max_tokens=40, params=params)
        verified = [s for s in result.steps if s.decision is not None]
        assert verified and all(s.decision.accepted and s.source == "draft" for s in verified)
        total += len(verified)
        # Fewer target forwards than tokens: whole steps were committed per pass.
        assert result.target_forwards < len(result.token_ids) + 1
    assert total >= len(PROMPTS)


def test_same_seed_same_output_and_other_seed_may_differ(decoder):
    params = decoder.config.specguard.model_copy(update={"draft_temperature": 1.5})
    ids = encode(decoder, PROMPTS[0])
    first = decoder.generate(ids, max_tokens=40, temperature=0.8, seed=11, params=params)
    second = decoder.generate(ids, max_tokens=40, temperature=0.8, seed=11, params=params)
    assert first.token_ids == second.token_ids
    assert [s.to_json() for s in first.steps] == [s.to_json() for s in second.steps]
    others = {tuple(decoder.generate(ids, max_tokens=40, temperature=0.8, seed=s, params=params).token_ids)
              for s in range(12, 18)}
    assert len(others | {tuple(first.token_ids)}) > 1


def test_steps_partition_the_output_and_end_at_delimiters(decoder):
    for prompt in PROMPTS:
        result = decoder.generate(encode(decoder, prompt), max_tokens=60)
        joined = [t for step in result.steps for t in step.token_ids]
        assert joined == result.token_ids
        for step in result.steps[:-1]:
            ends = decoder.segmenter.step_length(step.token_ids) is not None
            verified_full = step.decision is not None and step.decision.accepted and \
                len(step.drafted_ids) == decoder.config.num_speculative_tokens
            assert ends or verified_full


def test_in_loop_decisions_equal_scoring_from_scratch(decoder):
    """The cached verification pass and a fresh full forward agree on every step."""
    checked = 0
    for prompt in PROMPTS[:3]:
        ids = encode(decoder, prompt)
        result = decoder.generate(ids, max_tokens=40)
        sequence = list(ids) + result.token_ids
        for step in result.steps:
            if step.decision is None:
                continue
            again = decoder.score_step(sequence[: step.verified_context_len], step.drafted_ids)
            assert again.lpbv == pytest.approx(step.decision.lpbv, abs=1e-4)
            assert again.abgv == pytest.approx(step.decision.abgv, abs=1e-4)
            assert again.accepted == step.decision.accepted
            if step.decision.accepted:
                start = step.verified_context_len - len(ids)
                assert result.token_ids[start: start + len(step.drafted_ids)] == step.drafted_ids
            checked += 1
    assert checked > 0


def test_max_tokens_truncates_mid_step(decoder):
    params = decoder.config.specguard.model_copy(update={"tau": 0.0})
    for n in (1, 2, 5):
        result = decoder.generate(encode(decoder, PROMPTS[0]), max_tokens=n, params=params)
        assert len(result.token_ids) == n
        assert result.finish_reason in ("length", "stop")


def test_mismatched_vocab_draft_is_refused_with_both_sizes(tiny_pair):
    with pytest.raises(PairMismatchError) as info:
        ReferenceDecoder.from_paths(tiny_pair["target"], make_config(tiny_pair["bad_vocab_draft"]))
    message = str(info.value)
    from transformers import AutoConfig

    tv = AutoConfig.from_pretrained(tiny_pair["target"]).vocab_size
    dv = AutoConfig.from_pretrained(tiny_pair["bad_vocab_draft"]).vocab_size
    assert str(tv) in message and str(dv) in message


def test_prompt_longer_than_context_is_refused_with_lengths(decoder):
    ids = encode(decoder, "a = 1\n" * 200)
    with pytest.raises(ValueError, match=rf"prompt has {len(ids)} tokens.*context is 256"):
        decoder.generate(ids)


def test_too_many_grounding_layers_is_refused(tiny_pair):
    with pytest.raises(ValueError, match="grounding_layers is 9 but the target has only 4 layers"):
        ReferenceDecoder.from_paths(tiny_pair["target"], make_config(tiny_pair["draft"], grounding_layers=9))


@pytest.mark.parametrize("mode", ["specguard", "target", "draft"])
def test_trace_cli_json_has_engine_neutral_format(tiny_pair, tiny_config_path, mode):
    result = subprocess.run(
        [sys.executable, "-m", "specguard_vllm.cli", "trace", "--target", str(tiny_pair["target"]),
         "--config", str(tiny_config_path), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
         "--mode", mode, "--max-tokens", "24", "--json"],
        check=False, capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [line["prompt"] for line in lines] == PROMPTS[:2]
    for line in lines:
        assert set(line) == {"prompt", "text", "steps"}
        assert "".join(step["text"] for step in line["steps"]) == line["text"]
        for step in line["steps"]:
            assert set(step) == {"text", "source", "lpbv", "abgv", "score", "accepted", "tokens"}
            assert step["source"] in ("draft", "target")
            assert set(step["tokens"]) == {"step", "prefix", "sd", "target"}
            assert sum(step["tokens"].values()) >= 1


def test_trace_cli_refuses_bad_override_and_missing_target(tiny_pair, tiny_config_path):
    base = [sys.executable, "-m", "specguard_vllm.cli", "trace", "--config", str(tiny_config_path),
            "--prompt", "a"]
    bad_tau = subprocess.run(base + ["--target", str(tiny_pair["target"]), "--tau", "-1"],
                             check=False, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad_tau.returncode == 2 and "--tau" in bad_tau.stderr and "Traceback" not in bad_tau.stderr
    missing = subprocess.run(base + ["--target", "/nonexistent/model"],
                             check=False, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert missing.returncode == 2 and "/nonexistent/model" in missing.stderr


def test_speculative_fallback_is_lossless_and_needs_fewer_target_passes(decoder):
    """tau > 1 rejects every step; the speculative fallback still gives the target's text."""
    regenerate = decoder.config.specguard.model_copy(update={"tau": 1.01, "fallback": "target"})
    speculative = decoder.config.specguard.model_copy(update={"tau": 1.01, "fallback": "speculative"})
    fewer = 0
    for prompt in PROMPTS:
        ids = encode(decoder, prompt)
        target_only = decoder.generate(ids, mode="target", max_tokens=40)
        slow = decoder.generate(ids, max_tokens=40, params=regenerate)
        fast = decoder.generate(ids, max_tokens=40, params=speculative)
        assert fast.token_ids == target_only.token_ids == slow.token_ids, prompt
        assert fast.target_forwards <= slow.target_forwards
        fewer += fast.target_forwards < slow.target_forwards
        assert [s.text for s in fast.steps] == [s.text for s in slow.steps]
    assert fewer > 0


def test_token_level_verify_greedy_keeps_the_matching_prefix():
    from specguard_vllm.reference import token_level_verify

    logits = torch.full((4, 5), -10.0)
    for row, best in enumerate([1, 2, 3, 4]):
        logits[row, best] = 10.0
    gen = torch.Generator().manual_seed(0)
    assert token_level_verify(logits, [1, 2, 3], 0.0, gen) == [1, 2, 3, 4]  # all kept + bonus
    assert token_level_verify(logits, [1, 0, 3], 0.0, gen) == [1, 2]        # recovered at the miss
    assert token_level_verify(logits, [0], 0.0, gen) == [1]


def test_speculative_fallback_with_sampled_candidates_is_still_lossless(decoder):
    """k = 3 candidates at temperature 1.0, drafted past step ends: the target's greedy text."""
    params = decoder.config.specguard.model_copy(update={
        "tau": 1.01, "fallback": "speculative", "num_candidates": 3, "draft_temperature": 1.0})
    for prompt in PROMPTS:
        ids = encode(decoder, prompt)
        target_only = decoder.generate(ids, mode="target", max_tokens=40)
        assert decoder.generate(ids, max_tokens=40, params=params).token_ids == target_only.token_ids


def test_candidates_sample_their_step_and_draft_their_tail_greedily(decoder, monkeypatch):
    """Sampled candidates (T = 1.0) run past their step's end greedily: each tail token is
    the draft's argmax after the row so far, as token-level SD's draft does."""
    params = decoder.config.specguard.model_copy(update={
        "tau": 0.0, "fallback": "speculative", "num_candidates": 3, "draft_temperature": 1.0})
    seen = []
    draft_candidates = decoder._draft_candidates

    def spy(req, step_params, max_len):
        candidates = draft_candidates(req, step_params, max_len)
        seen.append((list(req.committed), candidates))
        return candidates

    monkeypatch.setattr(decoder, "_draft_candidates", spy)
    for prompt in PROMPTS:
        decoder.generate(encode(decoder, prompt), max_tokens=40, params=params)
    vocab = len(decoder.tokenizer)
    tails = 0
    for context, candidates in seen:
        for row, step_len in zip(candidates.rows, candidates.step_lens):
            if len(row) <= step_len:
                continue
            with torch.no_grad():
                logits = decoder.draft(torch.tensor([context + row])).logits[0, :, :vocab]
            first = len(context) + step_len
            assert row[step_len:] == logits[first - 1: len(context) + len(row) - 1] \
                .argmax(dim=-1).tolist()
            tails += 1
    assert tails > 0


def test_token_origins_account_for_every_committed_token(decoder):
    """Accepted steps' tails are verified token-level: their drafts count as "sd" tokens."""
    seen = {"step": 0, "prefix": 0, "sd": 0, "target": 0}
    for tau, fallback in ((0.0, "speculative"), (1.01, "speculative"), (0.6, "speculative"),
                          (0.6, "target")):
        params = decoder.config.specguard.model_copy(update={"tau": tau, "fallback": fallback})
        for prompt in PROMPTS:
            result = decoder.generate(encode(decoder, prompt), max_tokens=40, params=params)
            counts = [s.to_json()["tokens"] for s in result.steps]
            assert sum(sum(c.values()) for c in counts) == len(result.token_ids)
            for step, c in zip(result.steps, counts):
                assert len(step.origins) == len(step.token_ids)
                # An accepted step's drafts (after the tokens that opened its record);
                # only rejected steps keep a prefix.
                if step.source == "draft":
                    assert 1 <= c["step"] <= len(step.drafted_ids)
                    assert step.origins[-c["step"]:] == ["step"] * c["step"]
                if fallback == "target" or tau == 0.0:
                    assert c["prefix"] == 0
                if fallback == "target":
                    assert c["sd"] == 0
                seen = {k: seen[k] + c[k] for k in seen}
    assert all(seen.values()), seen


# ---------------------------------------------------------------------- request constraints


def _accepted_step_tokens(result) -> list[int]:
    """Tokens committed as part of accepted steps (origin "step")."""
    return [t for s in result.steps for t, o in zip(s.token_ids, s.origins) if o == "step"]


def _constraint_cases(decoder, free) -> dict:
    """One constraint of each kind the reference expresses, each aimed at tokens that an
    accepted step of the unconstrained run ``free`` commits (so it bites)."""
    from specguard_vllm.reference import RequestConstraints

    vocab = decoder.target.config.vocab_size
    generated = _accepted_step_tokens(free)
    common = [t for t in sorted(set(generated), key=generated.index)
              if t not in decoder.eos_token_ids]
    banned = common[0]
    # A two-token bad word (its second token is forbidden only after its first): two adjacent
    # tokens of one accepted step.
    step = next(s for s in free.steps if s.origins[-2:] == ["step", "step"])
    pair = tuple(step.token_ids[-2:])
    return {
        "bad_word": (RequestConstraints(vocab, bad_words=((banned,),)),
                     lambda ids: banned not in ids),
        "bad_pair": (RequestConstraints(vocab, bad_words=(pair,)),
                     lambda ids: all(tuple(ids[i:i + 2]) != pair for i in range(len(ids) - 1))),
        "allowed": (RequestConstraints(vocab, allowed_token_ids=tuple(
            t for t in range(vocab) if t not in common[:2])),
            lambda ids: not set(ids) & set(common[:2])),
    }


@pytest.mark.parametrize("fallback", ["speculative", "target"])
def test_constraints_hold_for_every_committed_token_at_tau_zero(decoder, fallback):
    """tau = 0 accepts every step; a constraint still holds for each committed token, and the
    same token was committed by an accepted step without it (the constraint bites)."""
    params = decoder.config.specguard.model_copy(update={"tau": 0.0, "fallback": fallback})
    bitten = 0
    for prompt in PROMPTS:
        ids = encode(decoder, prompt)
        free = decoder.generate(ids, max_tokens=40, params=params)
        for name, (constraints, holds) in _constraint_cases(decoder, free).items():
            assert not holds(free.token_ids), (name, "the unconstrained run should violate it")
            held = decoder.generate(ids, max_tokens=40, params=params, constraints=constraints)
            assert holds(held.token_ids), (prompt, name, held.text)
            verified = [s for s in held.steps if s.decision is not None]
            assert verified and all(s.decision.accepted for s in verified)
            bitten += 1
    assert bitten == 3 * len(PROMPTS)


def test_accepted_step_is_cut_before_its_first_forbidden_token(decoder):
    """Greedy, k = 1, tau = 0: the constrained run equals the unconstrained one up to the
    banned token's first place, where the target's own constrained argmax stands instead."""
    from specguard_vllm.reference import RequestConstraints

    params = decoder.config.specguard.model_copy(update={
        "tau": 0.0, "num_candidates": 1, "draft_temperature": 0.0})
    checked = 0
    for prompt in PROMPTS:
        ids = encode(decoder, prompt)
        free = decoder.generate(ids, max_tokens=40, params=params)
        inside = _accepted_step_tokens(free)
        if not inside:
            continue
        banned = inside[len(inside) // 2]
        at = free.token_ids.index(banned)
        held = decoder.generate(ids, max_tokens=40, params=params, constraints=RequestConstraints(
            decoder.target.config.vocab_size, bad_words=((banned,),)))
        assert held.token_ids[:at] == free.token_ids[:at]
        with torch.no_grad():
            logits = decoder.target(torch.tensor([list(ids) + free.token_ids[:at]])).logits[0, -1]
        logits[banned] = float("-inf")
        assert held.token_ids[at] == int(logits.argmax())
        checked += 1
    assert checked >= 3


def test_min_tokens_suppresses_eos_inside_accepted_steps(decoder):
    from specguard_vllm.reference import RequestConstraints

    params = decoder.config.specguard.model_copy(update={"tau": 0.0})
    eos = sorted(decoder.eos_token_ids)
    bitten = 0
    for prompt in PROMPTS:
        ids = encode(decoder, prompt)
        free = decoder.generate(ids, max_tokens=60, params=params)
        if free.finish_reason != "stop":
            continue
        least = len(free.token_ids) + 5
        held = decoder.generate(ids, max_tokens=60, params=params, constraints=RequestConstraints(
            decoder.target.config.vocab_size, min_tokens=least, stop_token_ids=tuple(eos)))
        assert not set(held.token_ids[:least - 1]) & set(eos), held.text
        assert len(held.token_ids) >= least
        bitten += 1
    assert bitten > 0, "no prompt ended with EOS within 60 tokens: min_tokens would not bite"


def test_scheduler_truncated_steps_are_verified_token_level_and_stay_open(decoder):
    """Two drafts a pass: no step longer than that is judged; tau > 1 stays lossless; tau = 0
    judges only steps that fit."""
    budget = 2
    lossless = decoder.config.specguard.model_copy(update={"tau": 1.01})
    everything = decoder.config.specguard.model_copy(update={"tau": 0.0})
    truncated_somewhere = False
    for prompt in PROMPTS:
        ids = encode(decoder, prompt)
        target_only = decoder.generate(ids, mode="target", max_tokens=40)
        assert decoder.generate(ids, max_tokens=40, params=lossless,
                                max_scheduled_drafts=budget).token_ids == target_only.token_ids
        free = decoder.generate(ids, max_tokens=40, params=everything)
        cut = decoder.generate(ids, max_tokens=40, params=everything, max_scheduled_drafts=budget)
        assert all(len(s.drafted_ids) <= budget for s in cut.steps if s.decision is not None)
        truncated_somewhere |= any(len(s.drafted_ids) > budget for s in free.steps
                                   if s.decision is not None)
        joined = [t for s in cut.steps for t in s.token_ids]
        assert joined == cut.token_ids
    assert truncated_somewhere, "no step was longer than the budget: nothing was truncated"
