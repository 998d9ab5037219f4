"""The copy head (`llm.copy_head`): a pointer-generator over the context that mixes copied tokens into
the LM head's distribution."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class CopyHead(nn.Module):
    """A pointer-generator over the context (See et al. 2017): the next token may be one that followed an
    earlier position, chosen by attention from this position to the earlier ones, and mixed into the LM
    head's distribution by a learned gate. In-context binding asks for exactly this (say the made-up word
    that followed the earlier picture like this one, syllable by syllable), and the tiny LLM does not learn
    it from binding documents on its own. Attention looks at every earlier
    position; the share on one whose follower may not be copied (a marker after a word's last token) goes
    back to the LM. Written here, not taken from a library, because it reads the LLM's KV-cached steps."""

    def __init__(self, width: int, key_width: int = 64):
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
