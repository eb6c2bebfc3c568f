"""The tokenizer's digit/newline properties, round-trip, and HF-format loading."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specguard_vllm.tasks import generate, render_solution
from specguard_vllm.training.tokenizer import (
    BOS,
    EOS,
    EOS_ID,
    build_tokenizer,
    prompt_text,
    save_tokenizer,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED = [REPO_ROOT / "models" / "tiny-target", REPO_ROOT / "models" / "tiny-draft"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(n_texts=3000)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(tok, out)
    return out


texts = st.text(alphabet=st.sampled_from(list("0123456789 \nabc+-*/=:.Answer")), max_size=80)


@settings(max_examples=200, deadline=None)
@given(text=texts)
def test_every_digit_and_newline_is_its_own_token(tok, text):
    pieces = [tok.id_to_token(i) for i in tok.encode(text, add_special_tokens=False).ids]
    decoded = [tok.decode([tok.token_to_id(p)]) for p in pieces]
    for piece in decoded:
        if any(ch.isdigit() or ch == "\n" for ch in piece):
            assert len(piece) == 1, (text, decoded)


@settings(max_examples=200, deadline=None)
@given(text=texts)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text


def test_task_text_round_trips_and_bos_is_added(tok):
    rng = random.Random(0)
    for p in generate("dev", 50):
        for text in (p.question, render_solution(p, rng)):
            enc = tok.encode(text)
            assert enc.ids[0] == tok.token_to_id(BOS)
            assert tok.decode(enc.ids[1:]) == text


def test_hf_autotokenizer_loads_and_chat_template_matches_training_prompt(saved):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(saved), local_files_only=True)
    assert hf.eos_token == EOS and hf.eos_token_id == EOS_ID
    q = "Mia has 12 red apples and 3 blue apples. How many apples does Mia have now?"
    rendered = hf.apply_chat_template([{"role": "user", "content": q}],
                                      add_generation_prompt=True, tokenize=False)
    assert rendered == prompt_text(q)
    ids = hf(rendered, add_special_tokens=False).input_ids
    assert ids == hf(prompt_text(q), add_special_tokens=False).input_ids
    assert ids.count(hf.bos_token_id) == 1


@pytest.mark.parametrize("model_dir", BUNDLED, ids=lambda p: p.name)
def test_bundled_tokenizer_files_are_complete(model_dir):
    import json

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "generation_config.json"):
        assert (model_dir / name).is_file(), name
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["chat_template"] == (model_dir / "chat_template.jinja").read_text()
    assert json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"] \
        == EOS_ID
