"""Whether everything said since the latest picture holds in it: a soft minimum of the presence probe's reads.

The presence probe (heads/presence.py, PresenceProbe) tells, word by word, whether the phrase just read is in
the picture. A caption holds only if every phrase does, so the judge keeps a running soft minimum of those reads,
each weighed by a gate on its word (learned, so that reads after words that end no phrase count little), and
tells its verdict to the LLM's input and final hidden state. Left to find and combine those reads itself, the
LLM mostly stays at chance on whether a caption fits its picture, though the lowest of the reads at the
captions' shape words already tells fitting captions from one-word changes. With it, `is there a {colour}
{shape}?` is answered from the picture (config.py, heads.agreement).

The soft minimum of reads l_j with gates g_j is -log(sum g_j exp(-l_j) / sum g_j); it is kept as the two
log-sums, which one more word updates in place (`extend`) and a picture restarts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nextmm.heads.base import Decoding, Head, Reading
from nextmm.heads.presence import balanced_bce
from nextmm.heads.words import Words


class AgreementJudge(Head):
    def __init__(self, width: int):
        super().__init__()
        self.gate = nn.Linear(width, 1)  # how much a word's read counts, from the word alone
        self.judge = nn.Linear(1, 1)  # starts as the identity: the soft minimum is the verdict's logit
        nn.init.ones_(self.judge.weight)
        nn.init.zeros_(self.judge.bias)
        # Zero: the LLM reads nothing from them until its loss finds what the verdict is worth. `holds` joins the
        # input embedding, `holds_at_top` the final hidden state, where one direction moves the next token's logits
        # straight away (a yes or a no) without the layers having to carry it there.
        self.holds = nn.Parameter(torch.zeros(width))
        self.holds_at_top = nn.Parameter(torch.zeros(width))

    def terms(self, embeds: torch.Tensor, reads: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        """Word embeddings (..., width), the probe's reads (...,) and which positions count (...,) -> (..., 2)
        log(g exp(-l)) and log g, -inf where nothing counts. Only the gate trains through it."""
        log_gate = F.logsigmoid(self.gate(embeds.detach().to(self.gate.weight.dtype)).float()).squeeze(-1)
        log_gate, reads = torch.broadcast_tensors(log_gate, reads.detach().float())
        terms = torch.stack([log_gate - reads, log_gate], -1)
        return terms.masked_fill(~counted[..., None], float("-inf"))

    @staticmethod
    def extend(sums: torch.Tensor, terms: torch.Tensor, restart: torch.Tensor) -> torch.Tensor:
        """The log-sums (B, 2) after one more position per row: its terms (B, 2), or none where `restart` (B,)."""
        empty = torch.full_like(sums, float("-inf"))
        return torch.where(restart[:, None], empty, torch.logaddexp(sums, terms))

    def verdict(self, sums: torch.Tensor) -> torch.Tensor:
        """(..., 2) log-sums -> (...,) logit that all that was said holds; 0 (even odds) where nothing was."""
        said = torch.isfinite(sums[..., 1])
        soft_min = torch.where(said, sums[..., 1] - sums[..., 0], 0.0)
        return torch.where(said, self.judge(soft_min[..., None]).squeeze(-1), 0.0)

    def told(self, sums: torch.Tensor, at_top: bool = False) -> torch.Tensor:
        """(..., 2) log-sums -> (..., width): (2 p - 1) x the learned direction for the input (or, `at_top`, for
        the final hidden state), nothing where nothing was said."""
        said = torch.isfinite(sums[..., 1])
        p = torch.sigmoid(self.verdict(sums)).detach()
        direction = self.holds_at_top if at_top else self.holds
        return torch.where(said[..., None], (2 * p - 1)[..., None] * direction.float(), 0.0)

    def input(self, reading: Reading) -> torch.Tensor | None:
        if "presence" not in reading.notes:
            return None
        seen, reads = reading.notes["presence"]
        ids = reading.input_ids
        with torch.no_grad():  # the gate trains by agreement_loss alone
            sums = self.sums(ids, self.terms(reading.model.llm.embed_tokens(ids), reads, seen), reading.heads.image_id, reading.starts)
        reading.notes["agreed"] = sums
        return self.told(sums)

    def top(self, reading: Reading) -> torch.Tensor | None:
        sums = reading.notes.get("agreed")
        return self.told(sums, at_top=True) if sums is not None else None

    @staticmethod
    def sums(input_ids: torch.Tensor, terms: torch.Tensor, image_id: int, starts: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids and the judge's terms (B, T, 2) -> its log-sums at every position (B, T, 2), over the
        positions since the latest picture (a picture's slots restart them, as does, in a packed row, each
        sample's start `starts` (B, T))."""
        steps = torch.arange(input_ids.shape[1], device=input_ids.device)
        restart = input_ids == image_id if starts is None else (input_ids == image_id) | starts
        start = torch.where(restart, steps, 0).cummax(1).values
        since = (steps[None, None, :] <= steps[None, :, None]) & (steps[None, None, :] >= start[:, :, None])  # (B, T, T)
        return torch.logsumexp(terms[:, None].masked_fill(~since[..., None], float("-inf")), 2)

    def losses(self, reading: Reading, hidden: torch.Tensor, labels: torch.Tensor, extras: dict) -> dict[str, torch.Tensor | None]:
        if extras.get("claims") is None:
            return {}
        valid = extras.get("valid")
        return {"agreement": self.agreement_loss(reading, torch.ones_like(reading.input_ids, dtype=torch.bool) if valid is None else valid, extras["claims"])}

    def agreement_loss(self, reading: Reading, valid: torch.Tensor, claims: torch.Tensor) -> torch.Tensor | None:
        """Binary cross-entropy of the verdict at the end of every sample that makes a claim about its last picture
        (`claims` (D,): 1 the text after it holds, 0 it does not, -1 no claim), on that picture and, as not
        holding, on every other picture of the batch; positives and negatives weigh half each. The text is what
        follows the sample's last picture. The samples are the rows' real tokens (`valid` (B, T)), or a packed
        batch's `documents`. None when no sample claims anything."""
        if reading.visual is None or not bool((claims >= 0).any()):
            return None
        documents = reading.documents
        if documents is None:
            documents = torch.where(valid, torch.arange(len(valid), device=valid.device)[:, None], -1)
        claiming = (claims >= 0).nonzero().squeeze(1)
        placed = documents[None] == claiming[:, None, None]  # (R, B, T)
        rows = placed.any(2).long().argmax(1)
        inside = placed[torch.arange(len(rows)), rows]  # (R, T): each claiming sample's positions in its row
        image_index = reading.latest_image[rows]
        ids = reading.input_ids[rows]
        last = inside.long().cumsum(1).argmax(1)
        own = image_index[torch.arange(len(rows)), last]
        said = reading.heads.is_word(ids) & inside & (image_index == own[:, None]) & (own[:, None] >= 0)
        claimed = said.any(1)  # a sample with no words after its picture has no verdict (nor a gradient through one)
        if not bool(claimed.any()):
            return None
        claiming, rows, ids, own, said = claiming[claimed], rows[claimed], ids[claimed], own[claimed], said[claimed]
        reads = reading.heads["presence"].phrase_logits(Words.mean(reading.phrase_bags(rows)[said]), reading.visual)  # (P, pictures)
        terms = self.terms(reading.model.llm.embed_tokens(ids[said])[:, None], reads, torch.ones_like(reads, dtype=torch.bool))
        member = said.nonzero()[:, 0][None, :] == torch.arange(len(rows), device=ids.device)[:, None]  # (R, P)
        sums = torch.logsumexp(terms[None].masked_fill(~member[..., None, None], float("-inf")), 1)  # (R, pictures, 2)
        holds = torch.zeros(sums.shape[:2], dtype=torch.bool, device=ids.device)
        holds[torch.arange(len(rows)), own] = claims[claiming] == 1
        return balanced_bce(self.verdict(sums), holds)

    def decoding(self, reading: Reading) -> Decoding | None:
        return Judging(self, reading) if "agreed" in reading.notes else None

    def rate_scales(self, settings) -> dict[str, float]:
        return {"gate": settings.presence_lr_scale, "judge": settings.presence_lr_scale, "holds": settings.told_lr_scale}


class Judging(Decoding):
    """The agreement judge while a batch decodes: each row's log-sums at its newest position (from the presence
    probe's reads of each token, Probing), and what it told every position's final hidden state."""

    def __init__(self, judge: AgreementJudge, reading: Reading):
        self.judge, self.reading = judge, reading
        agreed = reading.notes["agreed"]
        self.sums, self.tops = agreed[:, -1], judge.told(agreed, at_top=True)

    def _told_at_top(self) -> None:
        self.tops = torch.cat([self.tops, self.judge.told(self.sums, at_top=True)[:, None]], 1)

    def token(self, previous: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        seen, reads = self.reading.notes["presence_step"]
        terms = self.judge.terms(self.reading.model.llm.embed_tokens(token), reads, seen)
        self.sums = self.judge.extend(self.sums, terms, token == self.reading.heads.image_id)
        self._told_at_top()
        return self.judge.told(self.sums)

    def embedding(self) -> None:
        self.sums = torch.full_like(self.sums, float("-inf"))  # an embedding (a regressed picture's) restarts what was said
        self._told_at_top()

    def top(self, positions: int) -> torch.Tensor:
        return self.tops[:, -positions:]
