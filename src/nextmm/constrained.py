"""Trie-constrained decoding: generation that can only write one of a closed set of answers.

The allowed answers, tokenized as the model writes text (a target segment, then `[EOS]`), form a prefix
tree; at each step every token that does not continue some allowed answer from what the row has written
so far is masked out. Closed-set evaluations (image-text matching, zero-shot classification,
multiple-choice VQA) use it so that every prediction is a valid answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from nextmm.errors import UserError
from nextmm.tokenizer import NextTokenizer


class AnswerError(UserError):
    pass


class AnswerTrie:
    def __init__(self, sequences: Sequence[Sequence[int]]):
        if not sequences:
            raise AnswerError("the list of allowed answers is empty; give at least one answer")
        self.root: dict[int, dict] = {}
        for seq in sequences:
            node = self.root
            for token in seq:
                node = node.setdefault(token, {})
        self.depth = max(len(seq) for seq in sequences)

    @classmethod
    def from_answers(cls, tokenizer: NextTokenizer, answers: Sequence[str]) -> "AnswerTrie":
        cleaned = list(dict.fromkeys(a.strip() for a in answers))
        if not cleaned or "" in cleaned:
            raise AnswerError("an allowed answer is empty; every answer needs at least one word")
        return cls([tokenizer.encode(a) + [tokenizer.eos_id] for a in cleaned])

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """The tokens that may follow `prefix` (empty when it is a whole answer or leaves the tree)."""
        node = self.root
        for token in prefix:
            node = node.get(token)
            if node is None:
                return []
        return list(node)

    def mask(self, written: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """(B, vocab) additive mask for the next token of each row of `written` (B, steps so far): 0 where
        allowed, -inf elsewhere. A row with nothing left to write may only repeat its last token (the
        caller has marked it done)."""
        out = torch.full((written.shape[0], vocab_size), float("-inf"))
        for row, prefix in enumerate(written.tolist()):
            out[row, self.allowed(prefix) or prefix[-1:]] = 0.0
        return out


def read_answers(spec: str) -> list[str]:
    """The CLI's `--answers`: a file with one answer per line, or a comma-separated list."""
    path = Path(spec)
    if path.is_file():
        answers = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not answers:
            raise AnswerError(f"answers file '{spec}' has no answers; write one answer per line")
        return answers
    answers = [part.strip() for part in spec.split(",") if part.strip()]
    if not answers:
        raise AnswerError(f"--answers '{spec}' names no answers; give a comma-separated list or a file with one per line")
    return answers
