"""Train one pair member from scratch: a plain, deterministic PyTorch loop on CPU.

Budgets are step counts, not seconds, so a run reproduces on a busy machine; the
learning rate follows linear warmup then cosine decay to 10% over exactly that budget.
One thread per process in fp32 was the fastest setting on 2 cores (see
docs/tiny-pair-notes.md); train target and draft as two processes at once.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from specguard_vllm.tasks import generate
from specguard_vllm.training.data import batches, encode_examples
from specguard_vllm.training.model_config import PairMember, llama_config
from specguard_vllm.training.tokenizer import write_generation_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def lr_at(step: int, m: PairMember) -> float:
    """Linear warmup, then cosine from `m.lr` down to `0.1 * m.lr` at `m.steps`."""
    if step < m.warmup:
        return m.lr * (step + 1) / m.warmup
    progress = min(1.0, (step - m.warmup) / max(1, m.steps - m.warmup))
    return m.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model: torch.nn.Module, m: PairMember) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=m.lr, betas=(0.9, 0.95))


def save_member(model, tokenizer_dir: Path, out_dir: Path, log: dict) -> None:
    """save_pretrained (safetensors) plus the tokenizer files and a training log."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, out_dir / name)
    write_generation_config(out_dir)
    (out_dir / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")


def train_member(
    m: PairMember, tokenizer_dir: str | Path, out_dir: str | Path,
    save_at: tuple[int, ...] = (), seed: int = 0, init_from: str | Path | None = None,
) -> dict:
    """Train `m` for `m.train_steps` steps on fresh train-split problems; return the log.

    Every example is a distinct problem (`m.steps * m.batch_size` of them, one per
    example of the full schedule, so stopping early at `m.stop_at` replays exactly the
    same batches) with one randomly phrased solution; `m.data_seed` picks the stream,
    so target and draft see different problems and phrasings. With `init_from`, the
    weights start from that saved model (a fresh optimizer: a new cosine cycle).
    """
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    tokenizer_dir, out_dir = Path(tokenizer_dir), Path(out_dir)
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    vocab = 64 * math.ceil(tok.get_vocab_size() / 64)
    if init_from is None:
        model = LlamaForCausalLM(llama_config(m, vocab))
    else:
        model = LlamaForCausalLM.from_pretrained(str(init_from), dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())

    problems = generate("train", m.steps * m.batch_size, seed=m.data_seed)
    examples = encode_examples(tok, problems, seed=m.data_seed)
    stream = batches(examples, m.batch_size, seed=m.data_seed)
    opt = _optimizer(model, m)
    model.train()
    started, n_tokens, ema = time.monotonic(), 0, None
    bar = tqdm(range(m.train_steps), desc=m.name, mininterval=5.0)
    for step in bar:
        inputs, labels = next(stream)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, m)
        loss = model(input_ids=inputs, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        n_tokens += inputs.numel()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr_at(step, m):.1e}")
        if step + 1 in save_at and step + 1 < m.train_steps:
            save_member(model, tokenizer_dir, out_dir / "checkpoints" / f"step{step + 1}",
                        {"step": step + 1, "loss_ema": ema})
    log = {
        "member": m.to_dict(), "params": n_params, "vocab_size": vocab,
        "steps": m.train_steps, "examples": m.train_steps * m.batch_size, "tokens": n_tokens,
        "train_seconds": round(time.monotonic() - started, 1), "final_loss_ema": ema,
        "torch": torch.__version__, "init_from": str(init_from) if init_from else None,
    }
    model.eval()
    save_member(model, tokenizer_dir, out_dir, log)
    return log
