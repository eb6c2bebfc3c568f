"""Turn task problems into padded training batches with loss on the solution only."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch
from tokenizers import Tokenizer

from specguard_vllm.tasks import Problem, render_solution
from specguard_vllm.training.tokenizer import EOS_ID, PAD_ID, prompt_text

IGNORE = -100


def encode_examples(
    tok: Tokenizer, problems: list[Problem], seed: int
) -> list[tuple[list[int], int]]:
    """(token ids of prompt + solution + <eos>, prompt length) per problem.

    Each problem gets one solution phrased at random (seeded), so the model sees the
    phrasing distribution rather than one canonical form.
    """
    rng = random.Random(seed)
    prompts = tok.encode_batch([prompt_text(p.question) for p in problems],
                               add_special_tokens=False)
    sols = tok.encode_batch([render_solution(p, rng) for p in problems],
                            add_special_tokens=False)
    return [(pe.ids + se.ids + [EOS_ID], len(pe.ids)) for pe, se in zip(prompts, sols)]


def collate(examples: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example; labels mask the prompt and the padding.

    Right padding needs no attention mask under a causal mask: real tokens never
    attend to the pads that follow them.
    """
    width = max(len(ids) for ids, _ in examples)
    inputs = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(examples):
        inputs[row, : len(ids)] = torch.tensor(ids)
        labels[row, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
    return inputs, labels


def batches(
    examples: list[tuple[list[int], int]], batch_size: int, seed: int, bucket: int = 64
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled epochs of length-bucketed batches (less padding, same examples)."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        chunk = batch_size * bucket
        epoch = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start: start + chunk], key=lambda i: len(examples[i][0]))
            epoch += [part[i: i + batch_size] for i in range(0, len(part), batch_size)]
        rng.shuffle(epoch)
        for idx in epoch:
            if len(idx) == batch_size:
                yield collate([examples[i] for i in idx])
