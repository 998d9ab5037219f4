"""Constrained decoding: generation that can only write a valid answer.

`AnswerTrie`: the allowed answers, tokenized as the model writes text (a target segment, then `[EOS]`),
form a prefix tree; at each step every token that does not continue some allowed answer from what the
row has written so far is masked out. Closed-set evaluations (image-text matching, zero-shot
classification, multiple-choice VQA) use it so that every prediction is a valid answer.

`RowAnswers`: one `AnswerTrie` per prompt, for choices that differ from prompt to prompt (a few-shot
binding episode may only answer with the made-up words its own shots showed).

`BoxConstraint`: a grounding answer is exactly four location tokens x0 y0 x1 y1 with x1 > x0 and
y1 > y0 (OFA restricts its grounding output to location tokens), too many answers for a trie.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from nextmm.errors import UserError
from nextmm.tokenizer import NextTokenizer


class AnswerError(UserError):
    pass


class Constraint:
    """What generate_ids asks of a constraint: `depth`, the most tokens an answer takes, and `allowed`."""

    depth: int

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        raise NotImplementedError

    def allowed_in_row(self, row: int, prefix: Sequence[int]) -> list[int]:
        return self.allowed(prefix)

    def mask(self, written: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """(B, vocab) additive mask for the next token of each row of `written` (B, steps so far): 0 where
        allowed, -inf elsewhere. A row with nothing left to write may only repeat its last token (the
        caller has marked it done)."""
        out = torch.full((written.shape[0], vocab_size), float("-inf"))
        for row, prefix in enumerate(written.tolist()):
            out[row, self.allowed_in_row(row, prefix) or prefix[-1:]] = 0.0
        return out


class AnswerTrie(Constraint):
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


class RowAnswers(Constraint):
    def __init__(self, tries: Sequence[AnswerTrie]):
        if not tries:
            raise AnswerError("no prompts were given answers; give one list of allowed answers per prompt")
        self.tries = list(tries)
        self.depth = max(trie.depth for trie in self.tries)

    @classmethod
    def from_answers(cls, tokenizer: NextTokenizer, answer_lists: Sequence[Sequence[str]]) -> "RowAnswers":
        return cls([AnswerTrie.from_answers(tokenizer, answers) for answers in answer_lists])

    def rows(self, start: int, stop: int) -> "RowAnswers":
        return RowAnswers(self.tries[start:stop])

    def allowed_in_row(self, row: int, prefix: Sequence[int]) -> list[int]:
        return self.tries[row].allowed(prefix)


class BoxConstraint(Constraint):
    depth = 5  # x0 y0 x1 y1 [EOS]

    def __init__(self, tokenizer: NextTokenizer):
        if tokenizer.location_bins < 2:
            raise AnswerError("this tokenizer has no location tokens, so the model cannot write a box; train it with location_bins > 0")
        self.bins = tokenizer.bin_ids
        self.index = {token: k for k, token in enumerate(self.bins)}
        self.eos = tokenizer.eos_id

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        if len(prefix) < 2:
            return list(self.bins)
        if len(prefix) < 4:  # x1 after x0, y1 after y0; the last bin may only repeat itself
            start = self.index[prefix[-2]]
            return list(self.bins[min(start + 1, len(self.bins) - 1):])
        return [self.eos] if len(prefix) == 4 else []


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
