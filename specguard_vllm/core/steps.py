"""Where a step ends: the first token at which the step's text completes a delimiter.

SPECGUARD.md section 1. The delimiters are compiled once into a small automaton over
token ids (Aho-Corasick over the delimiters' characters, lifted to whole tokens): a
table ``next_state[state, token]`` whose state is how much of a delimiter the step's
text ends with, and whose absorbing state :attr:`StepSegmenter.END` means "the step
ended at this token" (a token containing a delimiter, one completing a delimiter that
earlier tokens started, e.g. "\\n\\n" written as two "\\n" tokens, or EOS). Finding a
step's end is then one table lookup per token, on the host or as one gather per
position over a whole batch on the device: no text is decoded while serving.

A step's text is the concatenation of its tokens' texts, each decoded after a plain
probe token, so the word-initial spaces of SentencePiece-style tokenizers are kept.
For byte-level tokenizers this is the text of the whole step, except that a character
split across tokens (a partial UTF-8 sequence) never matches a delimiter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

Decode = Callable[[Sequence[int]], str]


def _delimiter_automaton(delimiters: Sequence[str]) -> tuple[list[dict[str, int]], list[int], list[bool]]:
    """Aho-Corasick over characters: goto, failure links and "a delimiter ends here"."""
    goto: list[dict[str, int]] = [{}]
    final = [False]
    for delimiter in delimiters:
        node = 0
        for char in delimiter:
            if char not in goto[node]:
                goto.append({})
                final.append(False)
                goto[node][char] = len(goto) - 1
            node = goto[node][char]
        final[node] = True
    fail = [0] * len(goto)
    queue = list(goto[0].values())
    while queue:
        node = queue.pop(0)
        for char, child in goto[node].items():
            queue.append(child)
            back = fail[node]
            while back and char not in goto[back]:
                back = fail[back]
            fail[child] = goto[back].get(char, 0) if goto[back].get(char, 0) != child else 0
            final[child] = final[child] or final[fail[child]]
    return goto, fail, final


class StepSegmenter:
    """Finds step ends in token ids for a tokenizer and a list of delimiters."""

    def __init__(
        self,
        decode: Decode,
        vocab_size: int,
        delimiters: Sequence[str],
        eos_token_ids: Sequence[int] = (),
    ):
        if not delimiters or any(not isinstance(d, str) or d == "" for d in delimiters):
            raise ValueError("step delimiters must be a non-empty list of non-empty strings")
        self.decode = decode
        self.delimiters = list(delimiters)
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        goto, fail, final = _delimiter_automaton(self.delimiters)
        self.num_states = len(goto)
        self.END = self.num_states  # absorbing: the step has ended
        token_texts = self._token_texts(decode, vocab_size)
        delimiter_chars = set("".join(self.delimiters))
        # next_state[s, t]; a token with no delimiter character sends every state to the root.
        table = np.zeros((self.num_states + 1, vocab_size), dtype=np.int32)
        table[self.END, :] = self.END
        for token, text in enumerate(token_texts):
            if not delimiter_chars.intersection(text):
                continue
            for state in range(self.num_states):
                table[state, token] = self._run(goto, fail, final, state, text)
        for eos in self.eos_token_ids:
            if 0 <= eos < vocab_size:
                table[:, eos] = self.END
        self._table_rows = table.tolist()  # host lookups without numpy scalar overhead
        # Flat [(S + 1) * V], END's row a fresh step's: the step table's host automaton over
        # committed tokens, where a step that ends opens the next one (a state of END after
        # a token means that token ended a step).
        restarting = table.astype(np.int64)
        restarting[self.END] = restarting[0]
        self.restarting_table_host = restarting.reshape(-1)
        self.next_state = torch.from_numpy(table)  # [S + 1, V] int32 (see table_on)
        self._device_tables: dict[torch.device, torch.Tensor] = {}

    @staticmethod
    def _token_texts(decode: Decode, vocab_size: int) -> list[str]:
        """Each token's text as it reads inside a step: decoded after a plain probe token
        (a letter), whose own text is then cut off; the token alone where that fails."""
        alone = [decode([i]) for i in range(vocab_size)]
        probe = next((i for i, text in enumerate(alone) if len(text) == 1 and text.isalpha()), None)
        if probe is None:
            return alone
        head = alone[probe]
        texts = []
        for i, text in enumerate(alone):
            joined = decode([probe, i])
            texts.append(joined[len(head):] if joined.startswith(head) else text)
        return texts

    @staticmethod
    def _run(goto, fail, final, state: int, text: str) -> int:
        for char in text:
            while state and char not in goto[state]:
                state = fail[state]
            state = goto[state].get(char, 0)
            if final[state]:
                return len(goto)  # END
        return state

    @classmethod
    def from_tokenizer(cls, tokenizer, delimiters: Sequence[str], vocab_size: int | None = None):
        """Build from a Hugging Face tokenizer (decoding without cleanup, specials kept)."""
        size = vocab_size if vocab_size is not None else len(tokenizer)

        def decode(ids: Sequence[int]) -> str:
            ids = [i for i in ids if 0 <= i < len(tokenizer)]  # padding rows of an embedding
            return tokenizer.decode(ids, skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)

        eos = tokenizer.eos_token_id
        return cls(decode, size, delimiters, [] if eos is None else [eos])

    # ------------------------------------------------------------------ host
    def advance(self, state: int, token: int) -> int:
        """The automaton's state after ``token`` (END once the step has ended)."""
        if not 0 <= token < self.vocab_size:
            return 0 if state != self.END else state
        return self._table_rows[state][token]

    def state_after(self, tokens: Sequence[int], state: int = 0) -> int:
        """The state after an open step's tokens (0: a fresh step)."""
        for token in tokens:
            state = self.advance(state, int(token))
        return state

    def step_length(self, token_ids: Sequence[int], prefix: Sequence[int] = (),
                    state: int | None = None) -> int | None:
        """Number of tokens of ``token_ids`` up to and including the step end, or None.

        ``prefix`` holds tokens already in the current step (e.g. a bonus token), so a
        multi-token delimiter can start there; ``state`` is its automaton state if known.
        """
        state = self.state_after(prefix) if state is None else state
        for t, token in enumerate(token_ids):
            state = self.advance(state, int(token))
            if state == self.END:
                return t + 1
        return None

    # ------------------------------------------------------------------ device
    def table_on(self, device: torch.device) -> torch.Tensor:
        """The ``[S + 1, V]`` transition table on ``device`` (copied once per device)."""
        table = self._device_tables.get(device)
        if table is None:
            table = self._device_tables[device] = self.next_state.to(device=device,
                                                                     dtype=torch.int64)
        return table

    def advance_rows(self, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Every row's next state at once (``[R]`` states and tokens, same device)."""
        table = self.table_on(states.device)
        tokens = tokens.to(torch.int64)
        in_vocab = (tokens >= 0) & (tokens < self.vocab_size)
        nxt = table[states, tokens.clamp(0, self.vocab_size - 1)]
        return torch.where(in_vocab, nxt, torch.where(states == self.END, states, 0))

    def advance_drafted(self, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """:meth:`advance_rows` for int64 tokens known to lie in ``[0, vocab_size)``.

        The draft loop's own samples are (its logits are cut to the tokenizer's ids), so
        each drafted position costs one flat gather instead of range checks and a
        two-index gather: the loop runs this K times per engine step over every row.
        """
        flat = self.table_on(states.device).view(-1)
        return flat[states * self.vocab_size + tokens]

    def step_lengths(self, tokens: torch.Tensor, states: torch.Tensor,
                     lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Per row of ``tokens [R, L]`` (its open step in ``states [R]``), the step's length
        up to and including its end, or 0 where no step ends within the row's first
        ``lengths`` tokens (all L if None). L gathers over the batch, no host sync."""
        rows, width = tokens.shape
        ends = torch.zeros(rows, dtype=torch.int64, device=tokens.device)
        state = states.to(torch.int64)
        for t in range(width):
            state = self.advance_rows(state, tokens[:, t])
            hit = (state == self.END) & (ends == 0)
            if lengths is not None:
                hit = hit & (t < lengths)
            ends = torch.where(hit, t + 1, ends)
        return ends
