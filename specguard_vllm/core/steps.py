"""Where a step ends: the first token at which the step's text completes a delimiter.

SPECGUARD.md section 1. For one-token delimiters such as "\\n" this is "the first
token whose decoded text contains the delimiter", answered from a vocabulary
mask with no decoding. A delimiter that can span tokens ("\\n\\n" written as two
"\\n" tokens) is found by decoding the step's text, so both cases are exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Decode = Callable[[Sequence[int]], str]


class StepSegmenter:
    """Finds step ends in token ids for a tokenizer and a list of delimiters."""

    def __init__(
        self,
        decode: Decode,
        vocab_size: int,
        delimiters: Sequence[str],
        eos_token_ids: Sequence[int] = (),
    ):
        if not delimiters or any(d == "" for d in delimiters):
            raise ValueError("step delimiters must be a non-empty list of non-empty strings")
        self.decode = decode
        self.delimiters = list(delimiters)
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        token_texts = [decode([i]) for i in range(vocab_size)]
        self.contains_delimiter = torch.tensor(
            [any(d in text for d in self.delimiters) for text in token_texts], dtype=torch.bool
        )
        for eos in self.eos_token_ids:
            if 0 <= eos < vocab_size:
                self.contains_delimiter[eos] = True
        # Only delimiters longer than one character can be completed across tokens.
        self._needs_text_scan = any(len(d) > 1 for d in self.delimiters)

    @classmethod
    def from_tokenizer(cls, tokenizer, delimiters: Sequence[str], vocab_size: int | None = None):
        """Build from a Hugging Face tokenizer (decoding without cleanup, specials kept)."""
        size = vocab_size if vocab_size is not None else len(tokenizer)

        def decode(ids: Sequence[int]) -> str:
            return tokenizer.decode(list(ids), skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)

        eos = tokenizer.eos_token_id
        return cls(decode, size, delimiters, [] if eos is None else [eos])

    def ends_step(self, token_id: int) -> bool:
        """True when this single token ends a step by itself (delimiter inside or EOS)."""
        return 0 <= token_id < self.contains_delimiter.numel() and bool(
            self.contains_delimiter[token_id]
        )

    def step_length(self, token_ids: Sequence[int], prefix: Sequence[int] = ()) -> int | None:
        """Number of tokens of ``token_ids`` up to and including the step end, or None.

        ``prefix`` holds tokens already in the current step (e.g. a bonus token),
        so a multi-token delimiter can start there.
        """
        for t, token in enumerate(token_ids):
            if self.ends_step(int(token)):
                return t + 1
            if self._needs_text_scan and self._completes_delimiter(prefix, token_ids[: t + 1]):
                return t + 1
        return None

    def _completes_delimiter(self, prefix: Sequence[int], step: Sequence[int]) -> bool:
        before = self.decode(list(prefix) + list(step[:-1]))
        after = self.decode(list(prefix) + list(step))
        return any(d in after and after.count(d) > before.count(d) for d in self.delimiters)
