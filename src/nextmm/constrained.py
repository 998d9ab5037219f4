"""Constrained decoding: generation that can only write a valid answer.

`AnswerTrie`: the allowed answers, tokenized as the model writes text (a target segment, then `[EOS]`),
form a prefix tree; at each step every token that does not continue some allowed answer from what the
row has written so far is masked out. Closed-set evaluations (image-text matching, zero-shot
classification, multiple-choice VQA) use it so that every prediction is a valid answer.

`RowAnswers`: one `AnswerTrie` per prompt, for choices that differ from prompt to prompt (a few-shot
binding episode may only answer with the made-up words its own shots showed).

`BoxConstraint`: a grounding answer is exactly four location tokens x0 y0 x1 y1 with x1 > x0 and
y1 > y0 (OFA restricts its grounding output to location tokens), too many answers for a trie.

`DetectionGrammar`: a detection answer is "phrase box, phrase box, ...": the words are the model's own,
but an object ends only with its box, a box is a box as above, and after a box comes a comma or the end.
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

    def restrict(self, logits: torch.Tensor, written: torch.Tensor) -> torch.Tensor:
        """(B, vocab) next-token logits, and each row's tokens so far (B, steps) -> the logits, -inf wherever
        the constraint forbids."""
        return logits + self.mask(written, logits.shape[-1])

    def mask(self, written: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """(B, vocab) additive mask for the next token of each row of `written` (B, steps so far): 0 where
        allowed, -inf elsewhere. A row with nothing left to write may only repeat its last token (the
        caller has marked it done)."""
        out = torch.full((written.shape[0], vocab_size), float("-inf"), device=written.device)
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


class DetectionGrammar(BoxConstraint):
    """Detection's answer (data/sample.py's DETECT_QUESTION): each object's phrase in the model's own words,
    then its box (four location tokens, as BoxConstraint), then a comma and the next object, or the end.
    Where a phrase is open and the model would end, it writes the phrase's box instead: a small model may
    name an object and end there, never opening a box."""

    def __init__(self, tokenizer: NextTokenizer, depth: int):
        super().__init__(tokenizer)
        self.depth = depth
        self.comma = tokenizer.encode(",")  # byte-level BPE may write it as two tokens, its space and itself
        self.words = sorted(set(range(tokenizer.vocab_size)) - set(self.bins) - set(tokenizer.special_ids))

    def restrict(self, logits: torch.Tensor, written: torch.Tensor) -> torch.Tensor:
        would_end = logits.argmax(-1) == self.eos
        out = torch.full_like(logits, float("-inf"))
        for row, prefix in enumerate(written.tolist()):
            out[row, self._allowed(prefix, bool(would_end[row]))] = 0.0
        return logits + out

    def _allowed(self, prefix: list[int], would_end: bool) -> list[int]:
        in_box = 0  # location tokens at the end: at most four, as this grammar writes them
        while in_box < len(prefix) and prefix[-1 - in_box] in self.index:
            in_box += 1
        last_box = max((i for i, t in enumerate(prefix) if t in self.index), default=None)
        since_box = prefix[last_box + 1 :] if last_box is not None else None
        if 0 < in_box < 4:
            return BoxConstraint.allowed(self, prefix[-in_box:])
        if in_box == 4:
            return [self.comma[0], self.eos]
        if not prefix:
            return [*self.words, self.eos]  # an answer may list nothing
        if since_box is not None and len(since_box) < len(self.comma) and since_box == self.comma[: len(since_box)]:
            return [self.comma[len(since_box)]]
        if since_box == self.comma:
            return self.words  # the next phrase
        return list(self.bins) if would_end else [*self.words, *self.bins]  # a phrase is open: more words, or its box


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
