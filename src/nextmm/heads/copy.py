"""The copy head (`heads.copy`): a pointer-generator over the context that mixes copied tokens into
the LM head's distribution."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nextmm.heads.base import Decoding, Head, Reading


class CopyHead(Head):
    """A pointer-generator over the context (See et al. 2017): the next token may be one that followed an
    earlier position, chosen by attention from this position to the earlier ones, and mixed into the LM
    head's distribution by a learned gate. In-context binding asks for exactly this (say the made-up word
    that followed the earlier picture like this one, syllable by syllable), and the tiny LLM does not learn
    it from binding documents on its own. Attention looks at every earlier
    position; the share on one whose follower may not be copied (a marker after a word's last token) goes
    back to the LM. Written here, not taken from a library, because it reads the LLM's KV-cached steps."""

    def __init__(self, width: int, vision_width: int, key_width: int = 64):
        super().__init__()
        self.query = nn.Linear(width, key_width, bias=False)
        self.key = nn.Linear(width, key_width, bias=False)
        self.gate = nn.Linear(width, 1)
        nn.init.constant_(self.gate.bias, -3.0)  # ~5% copying at first: the LM's own distribution until copying pays
        # the gate also reads what the copy would say: a made-up word's syllables are copied, a known word's are not
        self.gate_on_proposal = nn.Linear(width, 1, bias=False)
        nn.init.zeros_(self.gate_on_proposal.weight)
        # Two cues given rather than learned, each with a learned weight; the learned keys find too little to go
        # on in the few binding documents of a demo. An earlier position that read the token this one reads is
        # where its continuation was written (an induction head's cue: the rest of a many-token word). And
        # the latest pictures' cosine: like pictures were followed by the same word.
        self.same_token = nn.Parameter(torch.tensor(10.0))
        self.like_pictures = nn.Parameter(torch.tensor(10.0))
        # the mean picture (`pictures_at`), kept as training goes, like a batch norm's running mean
        self.register_buffer("picture_mean", torch.zeros(vision_width))

    def logits(self, reading: Reading, hidden: torch.Tensor, which: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities with the copied tokens mixed in (`copying`)."""
        return self.mix(logits, hidden[which], self.copying(reading, hidden, which), reading.model.llm.embed_tokens.weight)

    def copying(self, reading: Reading, hidden: torch.Tensor, which: torch.Tensor) -> "Copying":
        """What the head may copy at the positions `which` (a (B, T) mask) of the batch's hidden states (B, T,
        width): it looks at every earlier position of its sample and may copy the token that followed it."""
        ids = reading.input_ids
        steps = torch.arange(ids.shape[1], device=ids.device)
        allowed = (steps[None, :] < steps[:, None]).expand(len(ids), -1, -1)  # j < t: ids[j + 1] is known at t
        if reading.same_document is not None:
            allowed = allowed & reading.same_document
        same = ids[:, :, None] == ids[:, None, :]
        pictures = self.pictures_at(reading, reading.patches)
        weights = self.attend(hidden, self.key(hidden), allowed, same, pictures @ pictures.transpose(1, 2))
        rows = which.nonzero()[:, 0]
        return Copying(weights[which], copy_sources(ids, reading.heads.uncopyable)[rows])

    def decoding(self, reading: Reading) -> Decoding:
        return Recall(self, reading)

    def rate_scales(self, settings) -> dict[str, float]:
        return {"gate": settings.copy_gate_lr_scale}

    def pictures_at(self, reading: Reading, patches: torch.Tensor | None) -> torch.Tensor:
        """The batch's ids and patch grids (M, P, vision width) -> (B, T, vision width): at each position, the
        latest picture before it as its patches' maximum less the mean picture, at unit length (zeros before
        any), detached. The maximum, as CLIP pools them: an object fills a few patches of a blank canvas."""
        ids = reading.input_ids
        if patches is None or not patches.numel():
            return torch.zeros(*ids.shape, len(self.picture_mean), device=ids.device)
        latest = reading.latest_image
        # Detached: the copy head does not train the vision tower, which a pointer's gradient through a
        # hidden layer collapses within the demo's stage 1.
        pooled = patches.detach().float().amax(1)
        if self.training:
            self.picture_mean.lerp_(pooled.mean(0), 0.01)
        # centred: every picture shares its blank canvas, so raw cosines hardly part one shot from another
        pooled = F.pad(F.normalize(pooled - self.picture_mean, dim=-1), (0, 0, 0, 1))  # a last row of zeros: no picture yet
        return pooled[torch.where(latest >= 0, latest, len(patches))]

    def attend(self, hidden: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, same_token: torch.Tensor, like_pictures: torch.Tensor) -> torch.Tensor:
        """hidden (B, Q, width) at the asking positions, keys (B, L, key width) the earlier positions' (`key`
        of their hidden states); for each pair (B, Q, L): allowed, where it may look; same_token, where the
        earlier position read the token the asking one reads; like_pictures, their latest pictures' cosine
        -> (B, Q, L) attention, all zero in a row that may look nowhere."""
        scores = torch.einsum("bqk,blk->bql", self.query(hidden).float(), keys.float()) / keys.shape[-1] ** 0.5
        scores = scores + self.same_token * same_token + self.like_pictures * like_pictures
        weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
        return torch.nan_to_num(weights, nan=0.0)

    def mix(self, logits: torch.Tensor, hidden: torch.Tensor, copying: "Copying", embeddings: torch.Tensor) -> torch.Tensor:
        """(R, V) the LM's logits -> (R, V) log-probabilities of (1 - g m) LM + g copy: g the gate
        (`opening`), m the attention's share on positions whose follower may be copied. The share on the
        others (a word's last token, followed by a marker) goes back to the LM, which is how a copied word ends."""
        copied = self.copied(copying, logits.shape[-1])
        gate = self.opening(hidden, copied, embeddings)
        share = gate * copied.sum(-1, keepdim=True)
        # clamped, so that the rows and tokens with nothing copied send no 0 x inf gradients back
        return torch.logaddexp(F.log_softmax(logits.float(), -1) + torch.log1p(-share.clamp_max(1 - 1e-6)), gate.clamp_min(1e-12).log() + copied.clamp_min(1e-12).log())

    def copied(self, copying: "Copying", vocab_size: int) -> torch.Tensor:
        """(R, V): the attention's share on each token it would copy."""
        copyable = copying.weights.float() * (copying.sources >= 0)
        return torch.zeros(len(copyable), vocab_size, device=copyable.device).scatter_add(1, copying.sources.clamp_min(0), copyable)

    def opening(self, hidden: torch.Tensor, copied: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """(R, 1) the gate, at `hidden` (R, width) and at what the copy proposes (`copied` over the (V, width)
        token `embeddings`)."""
        proposal = (copied @ embeddings.detach().float()).to(self.gate_on_proposal.weight.dtype)
        return torch.sigmoid(self.gate(hidden).float() + self.gate_on_proposal(proposal).float())


@dataclass
class Copying:
    """What the copy head may copy, for each row asking: its attention over earlier positions (R, L) and the
    token that followed each of them (R, L; -1 where none may be copied)."""

    weights: torch.Tensor
    sources: torch.Tensor


def copy_sources(input_ids: torch.Tensor, uncopyable: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T): the token that follows each position, where the copy head may copy it; else -1."""
    following = F.pad(input_ids[:, 1:], (0, 1), value=-1)
    return torch.where(torch.isin(following, uncopyable), -1, following)


class Recall(Decoding):
    """The copy head while a batch decodes: every position's key and the token it read (-1: an embedding no
    token gave), from which what followed it comes, and the latest picture at each position."""

    def __init__(self, head: CopyHead, reading: Reading):
        self.head, self.embeddings, self.uncopyable = head, reading.model.llm.embed_tokens.weight, reading.heads.uncopyable
        self.read_ids = reading.input_ids.clone()
        self.valid = reading.valid.clone() if reading.valid is not None else torch.ones_like(self.read_ids, dtype=torch.bool)
        self.pictures = head.pictures_at(reading, reading.patches)
        self.keys = None

    def _appended(self, read: torch.Tensor) -> None:
        self.read_ids = torch.cat([self.read_ids, read[:, None]], 1)
        self.valid = F.pad(self.valid, (0, 1), value=True)
        self.pictures = torch.cat([self.pictures, self.pictures[:, -1:]], 1)

    def token(self, previous: torch.Tensor, token: torch.Tensor) -> None:
        self._appended(token)

    def embedding(self) -> None:
        self._appended(torch.full_like(self.read_ids[:, -1], -1))

    def seen(self, hidden: torch.Tensor) -> None:
        keys = self.head.key(hidden)
        whole = hidden.shape[1] == self.read_ids.shape[1]  # the prompt, or every position without a KV cache
        self.keys = keys if whole else torch.cat([self.keys, keys], 1)

    def copying(self, hidden: torch.Tensor) -> Copying:
        """Where the copy head looks from the last position (hidden state (B, width)): every earlier one."""
        allowed = self.valid.clone()
        allowed[:, -1] = False  # the last position's follower is what is being chosen
        same = (self.read_ids == self.read_ids[:, -1:]) & (self.read_ids >= 0)
        like = self.pictures[:, -1:] @ self.pictures.transpose(1, 2)
        weights = self.head.attend(hidden[:, None], self.keys, allowed[:, None], same[:, None], like)
        return Copying(weights[:, 0], copy_sources(self.read_ids, self.uncopyable))

    def logits(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self.head.mix(logits, hidden, self.copying(hidden), self.embeddings)
