"""Score the tiny pair: greedy accuracy, per-step error rate, and draft/target agreement.

Agreement is the draft's teacher-forced next-token agreement with the target's greedy
solutions: feed each target solution (with its <eos>) to the draft after the prompt and
count the positions where the draft's argmax equals the target's token. It is a proxy
for token-level speculative decoding's acceptance rate.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specguard_vllm.tasks import Problem, grade_solution
from specguard_vllm.training.tokenizer import EOS_ID, PAD_ID, prompt_text


@dataclass
class ModelScore:
    accuracy: float
    step_error_rate: float
    n_steps: int
    well_formed: float
    verdicts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"accuracy": self.accuracy, "step_error_rate": self.step_error_rate,
                "n_step_lines": self.n_steps, "well_formed": self.well_formed,
                "verdicts": self.verdicts}


def load(path: str | Path):
    """(tokenizer, model) from a pair directory, offline, fp32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                 local_files_only=True)
    return tok, model.eval()


def prompt_ids(tok, problems: list[Problem]) -> list[list[int]]:
    return [tok(prompt_text(p.question), add_special_tokens=False).input_ids for p in problems]


@torch.inference_mode()
def greedy_solutions(
    model, prompts: list[list[int]], batch_size: int = 128, max_new_tokens: int = 160
) -> list[list[int]]:
    """Greedy continuations (token ids, up to and including <eos> when produced)."""
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(chunk):  # left padding, so every row ends at `width`
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=EOS_ID,
                             pad_token_id=PAD_ID)
        for row in gen[:, width:].tolist():
            out.append(row[: row.index(EOS_ID) + 1] if EOS_ID in row else row)
    return out


def score(problems: list[Problem], texts: list[str]) -> ModelScore:
    """Final-answer accuracy and the share of produced step lines that are wrong."""
    grades = [grade_solution(p, t) for p, t in zip(problems, texts)]
    verdicts = collections.Counter(s.verdict for g in grades for s in g.steps)
    n_steps = sum(verdicts.values())
    return ModelScore(
        accuracy=sum(g.correct for g in grades) / len(grades),
        step_error_rate=(n_steps - verdicts["right"]) / max(n_steps, 1),
        n_steps=n_steps,
        well_formed=sum(g.well_formed for g in grades) / len(grades),
        verdicts=dict(verdicts),
    )


@torch.inference_mode()
def teacher_forced_agreement(
    draft, prompts: list[list[int]], solutions: list[list[int]], batch_size: int = 128
) -> float:
    """Share of solution tokens where the draft's argmax equals the given token."""
    agree = total = 0
    for start in range(0, len(prompts), batch_size):
        rows = [p + s for p, s in zip(prompts[start: start + batch_size],
                                      solutions[start: start + batch_size])]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row)
        pred = draft(input_ids=ids).logits.argmax(-1)
        for r, (p, s) in enumerate(zip(prompts[start: start + batch_size],
                                       solutions[start: start + batch_size])):
            if not s:
                continue
            guess = pred[r, len(p) - 1: len(p) + len(s) - 1]
            agree += int((guess == torch.tensor(s)).sum())
            total += len(s)
    return agree / max(total, 1)


def decode(tok, solutions: list[list[int]]) -> list[str]:
    return [tok.decode(s, skip_special_tokens=True) for s in solutions]


def evaluate_model(path: str | Path, problems: list[Problem]) -> tuple[ModelScore, list[str]]:
    """Greedy-decode one model on `problems` and grade it."""
    tok, model = load(path)
    texts = decode(tok, greedy_solutions(model, prompt_ids(tok, problems)))
    return score(problems, texts), texts


def evaluate_pair(target: str | Path, draft: str | Path, problems: list[Problem]) -> dict:
    """Everything `specguard eval-pair` reports, plus sample draft errors."""
    tok, t_model = load(target)
    _, d_model = load(draft)
    prompts = prompt_ids(tok, problems)
    t_ids = greedy_solutions(t_model, prompts)
    d_ids = greedy_solutions(d_model, prompts)
    t_texts, d_texts = decode(tok, t_ids), decode(tok, d_ids)
    t_score, d_score = score(problems, t_texts), score(problems, d_texts)
    agreement = teacher_forced_agreement(d_model, prompts, t_ids)
    samples = []
    for p, dt, tt in zip(problems, d_texts, t_texts):
        g = grade_solution(p, dt)
        wrong = [s for s in g.steps if not s.right]
        if wrong and len(samples) < 5:
            samples.append({"question": p.question, "draft": dt, "target": tt,
                            "gold_answer": p.answer,
                            "wrong_lines": [(s.line, s.verdict) for s in wrong]})
    return {
        "target": t_score.summary(),
        "draft": d_score.summary(),
        "agreement": agreement,
        "n": len(problems),
        "sample_draft_errors": samples,
    }
