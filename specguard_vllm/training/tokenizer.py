"""Build the tiny pair's tokenizer with the `tokenizers` library and save it in HF format.

Byte-level BPE trained on task text, with every digit and every newline its own
token (pre-tokenization isolates them, so no merge can ever absorb one): arithmetic
then works digit by digit and step boundaries are single tokens, as SpecGuard's step
segmentation expects. The files are written by hand so that both transformers 5.x
(`AutoTokenizer`) and vLLM load them: `tokenizer_class` is the v4/v5-neutral
`PreTrainedTokenizerFast`, and the chat template is both inline and in
`chat_template.jinja`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from specguard_vllm.tasks import generate, render_solution

PAD, BOS, EOS, USER, ASSISTANT = "<pad>", "<bos>", "<eos>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, USER, ASSISTANT]  # ids 0..4
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def prompt_text(question: str) -> str:
    """The exact text the chat template renders for one user turn plus generation prompt."""
    return f"{BOS}{USER}\n{question}\n{ASSISTANT}\n"


def build_tokenizer(vocab_size: int = 1024, n_texts: int = 20000, seed: int = 0) -> Tokenizer:
    """Train byte-level BPE on task questions and solutions (train split only)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(seed)
    texts = []
    for p in generate("train", n_texts, seed=10_000 + seed):
        texts += [p.question, render_solution(p, rng)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)],
    )
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: str | Path, model_max_length: int = 512) -> None:
    """Write tokenizer.json and the HF side files that transformers and vLLM read."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None,
        "add_bos_token": False, "add_eos_token": False,
        "additional_special_tokens": [USER, ASSISTANT],
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
                   "additional_special_tokens": [USER, ASSISTANT]}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def write_generation_config(out_dir: str | Path) -> None:
    """Greedy by default, stop at <eos>: what eval and the demo assume."""
    cfg = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
           "do_sample": False, "max_new_tokens": 160}
    (Path(out_dir) / "generation_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
