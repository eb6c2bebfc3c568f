"""Tiny Llama pairs built inside the tests, with a tokenizer built locally.

A few dozen training steps on synthetic "variable = expression" lines give
models that write lines ending in newlines (so steps end at delimiters), in
seconds on one CPU core. Nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

NAMES = "abcdefgh"


def corpus_lines(rng: random.Random, n: int) -> list[str]:
    texts = []
    for _ in range(n):
        lines, known = [], []
        for _ in range(rng.randint(2, 5)):
            name = rng.choice([c for c in NAMES if c not in known] or list(NAMES))
            if known and rng.random() < 0.7:
                expr = f"{rng.choice(known)} + {rng.randint(1, 9)}"
            else:
                expr = str(rng.randint(1, 20))
            lines.append(f"{name} = {expr}")
            known.append(name)
        texts.append("\n".join(lines) + "\nanswer " + known[-1] + "\n")
    return texts


def build_tokenizer(out_dir: Path, texts: list[str], vocab_size: int = 96):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    fast.save_pretrained(out_dir)
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return fast


def build_model(out_dir: Path, tokenizer, texts: list[str], *, layers: int, hidden: int,
                steps: int, seed: int, vocab_size: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    vocab = vocab_size or len(tokenizer)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=1,
        head_dim=32, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    encoded = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        batch = rng.sample(encoded, 16)
        width = max(len(b) for b in batch)
        ids = torch.tensor([b + [tokenizer.pad_token_id] * (width - len(b)) for b in batch])
        labels = ids.clone()
        labels[labels == tokenizer.pad_token_id] = -100
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return model


def pad_vocabulary(src: Path, dst: Path, rows: int, scale: float = 3.0) -> None:
    """A copy of the model at ``src`` whose (tied) embedding is padded to ``rows`` rows.

    Padding row ``V + i`` is ``scale`` times real row ``i % V``, so its logit is ``scale``
    times a real token's: a proposer that did not mask padding ids would pick them.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(src)
    real = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        index = torch.arange(real, rows) % real
        weight[real:] = scale * weight[index]
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))


def with_sliding_window(src: Path, dst: Path, window: int) -> Path:
    """A copy of the model at ``src`` whose last layer uses sliding-window attention."""
    import shutil

    shutil.copytree(src, dst, dirs_exist_ok=True)
    cfg_path = dst / "config.json"
    cfg = json.loads(cfg_path.read_text())
    layers = cfg["num_hidden_layers"]
    cfg["layer_types"] = ["full_attention"] * (layers - 1) + ["sliding_attention"]
    cfg["sliding_window"] = window
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return dst


def build_tiny_pair(root: Path, seed: int = 0) -> dict[str, Path]:
    """target (4 layers), draft (2 layers, less trained), the draft with its embedding padded
    to another size (same tokenizer), and a draft with a different tokenizer."""
    torch.set_num_threads(1)
    rng = random.Random(seed)
    texts = corpus_lines(rng, 2000)
    names = ("tokenizer", "target", "draft", "padded_draft", "other_tokenizer", "bad_vocab_draft")
    paths = {name: root / name for name in names}
    for p in paths.values():
        p.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(paths["tokenizer"], texts)
    build_model(paths["target"], tokenizer, texts, layers=4, hidden=64, steps=200, seed=seed)
    build_model(paths["draft"], tokenizer, texts, layers=2, hidden=64, steps=90, seed=seed + 1)
    pad_vocabulary(paths["draft"], paths["padded_draft"], rows=2 * len(tokenizer) + 13)
    other = build_tokenizer(paths["other_tokenizer"], texts, vocab_size=len(tokenizer) + 15)
    build_model(paths["bad_vocab_draft"], other, texts, layers=1, hidden=32, steps=1, seed=seed + 2)
    return paths
