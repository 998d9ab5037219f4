"""The Emu model: ViT -> causal resampler -> visual embeddings, interleaved with token embeddings in a
LLaMA-style decoder that predicts the next word (cross-entropy) and the next visual embedding (L2).

Sequence layout: `[IMG]` + N x `<image>` + `[/IMG]` per picture; the `<image>` slots are filled, in
reading order, with the projected visual embeddings. The hidden state at `[IMG]` and at each `<image>`
but the last regresses the next visual embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nextmm.config import Config
from nextmm.heads.agreement import AgreementJudge
from nextmm.heads.copy import Copying, CopyHead
from nextmm.heads.location import Sight, location_head_for
from nextmm.heads.presence import PresenceProbe, balanced_bce
from nextmm.models.llm import KVCache, LLaMA
from nextmm.models.resampler_t5 import resampler_for
from nextmm.models.vision import VisionTransformer

IGNORE = -100
PHRASE_DECAY = 0.5  # Emu.phrase_bags: each earlier word counts half as much as the one after it


class Emu(nn.Module):
    def __init__(self, cfg: Config, image_token_id: int, location_ids: list[int] = (), special_ids: list[int] = ()):
        super().__init__()
        self.cfg = cfg
        self.image_token_id = image_token_id
        # <bin_0> ... <bin_{B-1}> in order, for the soft location targets of `loss`; not saved with the weights
        self.register_buffer("location_ids", torch.tensor(list(location_ids), dtype=torch.long), persistent=False)
        # what the copy head never copies: markers and image slots (boxes come from the location head)
        uncopyable = [image_token_id, *location_ids, *special_ids]
        self.register_buffer("uncopyable", torch.tensor(uncopyable, dtype=torch.long), persistent=False)
        self.vision = VisionTransformer(cfg.vision)
        self.ln_visual = nn.LayerNorm(cfg.vision.width, eps=1e-6) if cfg.emu.visual_norm else None
        self.resampler = resampler_for(cfg.resampler, cfg.vision.width)
        self.visual_proj = nn.Linear(cfg.resampler.width, cfg.llm.width)
        self.llm = LLaMA(cfg.llm)
        self.regression_head = nn.Linear(cfg.llm.width, cfg.visual_width, bias=False)
        # OFA's location tokens get their logits from LocationHead (none when the tokenizer has no bins)
        self.location_head = location_head_for(cfg, len(location_ids))
        self.copy_head = CopyHead(cfg.llm.width) if cfg.llm.copy_head else None
        self.presence = PresenceProbe(cfg.llm.width, cfg.visual_width) if cfg.llm.presence and self.reads_words else None
        self.agreement = AgreementJudge(cfg.llm.width) if cfg.llm.agreement and self.presence is not None else None
        # The prompt's words regress the image too, straight from their embeddings (the bag at `[IMG]`, one map
        # per embedding of the N): the LLM routes a prompt's content to `[IMG]` only after many text-to-image
        # batches. Zero: the LLM's regression alone until the L2 finds it worth more.
        n, visual_width = cfg.resampler.num_queries, cfg.visual_width
        self.words_to_visual = nn.Parameter(torch.zeros(cfg.llm.width, n * visual_width)) if cfg.llm.regress_from_words and self.reads_words else None
        # the mean picture (`pictures_at`), kept as training goes, like a batch norm's running mean
        self.register_buffer("picture_mean", torch.zeros(cfg.vision.width) if cfg.llm.copy_head else None)

    @property
    def num_queries(self) -> int:
        return self.cfg.resampler.num_queries

    @property
    def regresses_in_llm_width(self) -> bool:
        return self.cfg.emu.regress_in == "llm"

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(M, 3, H, W) -> visual embeddings (M, N, cfg.visual_width): what the LLM regresses."""
        return self.see(pixels)[0]

    def visual_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(M, 3, H, W) -> the tower's tokens (M, T, vision width) as the causal transformer reads them."""
        features = self.vision(pixels)
        return self.ln_visual(features) if self.ln_visual is not None else features

    def see(self, pixels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(M, 3, H, W) -> the visual embeddings and the encoder's patch grid (M, patches, vision width),
        which the location head points into; (None, None) for no images."""
        if not pixels.numel():
            return None, None
        features = self.visual_tokens(pixels)
        visual = self.resampler(features)
        return self.visual_proj(visual) if self.regresses_in_llm_width else visual, features[:, self.vision.cls_tokens :]

    def to_llm(self, visual: torch.Tensor) -> torch.Tensor:
        """Visual embeddings (..., cfg.visual_width) -> the LLM's input embeddings (..., LLM width)."""
        return visual if self.regresses_in_llm_width else self.visual_proj(visual)

    def is_word(self, ids: torch.Tensor) -> torch.Tensor:
        """Which tokens are words: neither an image slot nor a location token."""
        return ~((ids == self.image_token_id) | torch.isin(ids, self.location_ids))

    def latest_image(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> for each position, the index (among the batch's images, in reading order) of the last
        image whose slots it follows, or -1 when its row has none before it."""
        slots = (input_ids == self.image_token_id).long()
        in_row = slots.cumsum(1)
        earlier_rows = slots.sum(1).cumsum(0) - slots.sum(1)
        index = torch.div(earlier_rows[:, None] + in_row - 1, self.num_queries, rounding_mode="floor")
        return torch.where(in_row > 0, index, -1)

    @property
    def reads_words(self) -> bool:
        """Whether the location head's pointer also reads the words that name the object (word_bags)."""
        return self.location_head is not None and self.location_head.pointer is not None and self.location_head.pointer.words is not None

    def word_bags(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """(B, T) -> (B, T, width) fp32: at each position, the gated sum of the embeddings of the words since
        the latest image or box. A run of words starts after an image's slots and after a box (the first word
        after a location token); inside a box the bag stays that of the words before it. So a grounding
        question's box reads its question, and each box of a detection answer its own object's phrase.
        None when the pointer does not read words."""
        if not self.reads_words:
            return None
        is_image = input_ids == self.image_token_id
        is_location = torch.isin(input_ids, self.location_ids)
        is_word = ~(is_image | is_location)
        restart = is_image | (is_word & F.pad(is_location[:, :-1], (1, 0)))
        steps = torch.arange(input_ids.shape[1], device=input_ids.device)
        start = torch.where(restart, steps, 0).cummax(1).values
        total = self._weighed_words(input_ids, is_word).cumsum(1)
        before = total.gather(1, (start - 1).clamp_min(0)[..., None].expand_as(total))
        return total - torch.where((start > 0)[..., None], before, 0.0)

    def box_roles(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T): which coordinate of a box the next token would be (0 x0, 1 y0, 2 x1, 3 y1), from
        how many location tokens end at each position."""
        is_location = torch.isin(input_ids, self.location_ids)
        steps = torch.arange(input_ids.shape[1], device=input_ids.device)
        last_other = torch.where(is_location, -1, steps).cummax(1).values
        return (steps - last_other) % 4

    def next_box_roles(self, roles: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The roles after one more token per row (B,), as box_roles over the longer sequences would give."""
        return torch.where(torch.isin(tokens, self.location_ids), (roles + 1) % 4, 0)

    def next_word_bags(self, bags: torch.Tensor, previous: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """One more token per row: bags (B, width) from word_bags, the rows' previous tokens (B,) and the new
        ones (B,) -> the bags at the new tokens, as word_bags over the longer sequences would give."""
        is_image = tokens == self.image_token_id
        is_word = ~(is_image | torch.isin(tokens, self.location_ids))
        restart = is_image | (is_word & torch.isin(previous, self.location_ids))
        added = self._weighed_words(tokens, is_word)
        return torch.where(restart[:, None], added, bags + added)

    def _weighed_words(self, ids: torch.Tensor, is_word: torch.Tensor) -> torch.Tensor:
        return self._weighed(self.llm.embed_tokens(ids), is_word)

    def _weighed(self, embeds: torch.Tensor, is_word: torch.Tensor) -> torch.Tensor:
        return (self.location_head.pointer.word_weight(embeds) * embeds.float()) * is_word[..., None]

    @torch.no_grad()
    def _phrase_terms(self, ids: torch.Tensor, is_word: torch.Tensor) -> torch.Tensor:
        """(..., width + 1): each word's gated embedding and, last, its gate (zeros for other tokens)."""
        embeds = self.llm.embed_tokens(ids.clamp_min(0)).float()
        weight = self.location_head.pointer.word_weight(embeds) * is_word[..., None]
        return torch.cat([weight * embeds, weight], -1)

    def phrase_bags(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T, width + 1): at each position, the words since the latest image or box (as in
        `word_bags`) summed with weights PHRASE_DECAY ** (how many tokens back), their gates summed last.
        Its mean (`_bag_mean`) is mostly the phrase that just ended: "a large red circle above a small blue
        square" at "square" is mostly "small blue square". Detached: the presence probe trains nothing else."""
        is_image = input_ids == self.image_token_id
        is_location = torch.isin(input_ids, self.location_ids)
        is_word = ~(is_image | is_location)
        restart = is_image | (is_word & F.pad(is_location[:, :-1], (1, 0)))
        steps = torch.arange(input_ids.shape[1], device=input_ids.device)
        start = torch.where(restart, steps, 0).cummax(1).values  # (B, T)
        back = (steps[:, None] - steps[None, :]).clamp_min(0).float()  # (T, T): how far j is behind t
        decay = torch.where((steps[None, :, None] >= steps[None, None, :]) & (steps[None, None, :] >= start[:, :, None]), PHRASE_DECAY**back, 0.0)
        return decay @ self._phrase_terms(input_ids, is_word)

    def next_phrase_bags(self, bags: torch.Tensor, previous: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """One more token per row, as `next_word_bags` for `phrase_bags`."""
        is_image = tokens == self.image_token_id
        is_word = ~(is_image | torch.isin(tokens, self.location_ids))
        restart = is_image | (is_word & torch.isin(previous, self.location_ids))
        added = self._phrase_terms(tokens, is_word)
        return torch.where(restart[:, None], added, PHRASE_DECAY * bags + added)

    def phrase_bags_of(self, phrases: torch.Tensor) -> torch.Tensor:
        """(R, L) phrases padded with -1 -> (R, width + 1): each one's bag at its last word, as `phrase_bags`
        gives it at that word of a sequence."""
        is_word = phrases >= 0
        last = is_word.long().cumsum(1).argmax(1, keepdim=True)
        back = (last - torch.arange(phrases.shape[1], device=phrases.device)).clamp_min(0).float()
        return ((PHRASE_DECAY**back)[..., None] * self._phrase_terms(phrases, is_word)).sum(1)

    @staticmethod
    def _bag_mean(bags: torch.Tensor) -> torch.Tensor:
        return bags[..., :-1] / bags[..., -1:].clamp_min(1e-6)

    def presence_reads(self, bags: torch.Tensor, words: torch.Tensor, image_index: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """bags (..., width + 1) from `phrase_bags`, whether each position is a word (...,), its latest image
        (..., -1 for none), the batch's visual embeddings (M, N, visual width) -> which positions the presence
        probe reads (words after a picture) (...,) and its logits there (...,; 0 elsewhere), detached."""
        seen = words & (image_index >= 0)
        reads = torch.zeros(bags.shape[:-1], device=bags.device)
        if bool(seen.any()):
            reads = reads.index_put((seen,), self.presence.logits(self._bag_mean(bags[seen]), visual, image_index[seen]).detach().float())
        return seen, reads

    def presence_told(self, seen: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
        """What the probe's reads (...,) add to the input embeddings of the positions it read (...,): (..., width)."""
        found = torch.where(seen, 2 * torch.sigmoid(reads) - 1, 0.0)
        return found[..., None] * self.presence.found.float()

    def presence_of(self, input_ids: torch.Tensor, visual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T) ids and the batch's visual embeddings -> what the presence probe and the agreement judge add
        to the input embeddings (B, T, width), and the judge's log-sums at every position (B, T, 2) (None
        without a judge)."""
        if self.presence is None or visual is None:
            return torch.zeros(*input_ids.shape, self.cfg.llm.width, device=input_ids.device), None
        seen, reads = self.presence_reads(self.phrase_bags(input_ids), self.is_word(input_ids), self.latest_image(input_ids), visual)
        told = self.presence_told(seen, reads)
        if self.agreement is None:
            return told, None
        with torch.no_grad():  # the gate trains by agreement_loss alone
            sums = self.agreement_sums(input_ids, self.agreement.terms(self.llm.embed_tokens(input_ids), reads, seen))
        return told + self.agreement.told(sums), sums

    def agreement_sums(self, input_ids: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and the judge's terms (B, T, 2) -> its log-sums at every position (B, T, 2), over the
        positions since the latest picture (a picture's slots restart them)."""
        steps = torch.arange(input_ids.shape[1], device=input_ids.device)
        start = torch.where(input_ids == self.image_token_id, steps, 0).cummax(1).values
        since = (steps[None, None, :] <= steps[None, :, None]) & (steps[None, None, :] >= start[:, :, None])  # (B, T, T)
        return torch.logsumexp(terms[:, None].masked_fill(~since[..., None], float("-inf")), 2)

    def presence_step(self, bags: torch.Tensor, sums: torch.Tensor | None, tokens: torch.Tensor, image_index: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One more token per row (B,), with the rows' phrase bags at it (B, width + 1) and the judge's log-sums
        before it (B, 2) -> what joins its input embedding (B, width) and the log-sums after it, as
        `presence_of` over the longer sequences would give."""
        seen, reads = self.presence_reads(bags, self.is_word(tokens), image_index, visual)
        told = self.presence_told(seen, reads)
        if sums is None:
            return told, None
        terms = self.agreement.terms(self.llm.embed_tokens(tokens), reads, seen)
        sums = self.agreement.extend(sums, terms, tokens == self.image_token_id)
        return told + self.agreement.told(sums), sums

    def presence_loss(self, visual: torch.Tensor | None, region_ids: torch.Tensor, region_image: torch.Tensor) -> torch.Tensor | None:
        """Binary cross-entropy of the presence probe for every phrase of the batch's regions (SequenceBuilder.
        collate_regions) against every picture that has regions: in it when one of that picture's regions
        reads the same words. Positives and negatives weigh half each. A picture's regions are all its objects
        (Shapes World's object_regions; a scene never repeats a colour and shape). None without regions."""
        if self.presence is None or visual is None or len(region_ids) < 2:
            return None
        pictures = region_image.unique()
        same = (region_ids[:, None, :] == region_ids[None, :, :]).all(-1)  # (R, R) the same phrase
        inside = (same.float() @ (region_image[:, None] == pictures[None, :]).float()) > 0  # (R, pictures)
        logits = self.presence.logits(self._bag_mean(self.phrase_bags_of(region_ids)), visual[pictures])
        return balanced_bce(logits, inside)

    def agreement_loss(self, input_ids: torch.Tensor, valid: torch.Tensor, visual: torch.Tensor | None, claims: torch.Tensor) -> torch.Tensor | None:
        """Binary cross-entropy of the agreement judge's verdict at the end of every row that makes a claim
        about its last picture (`claims` (B,): 1 the text after it holds, 0 it does not, -1 no claim), on that
        picture and, as not holding, on every other picture of the batch; positives and negatives weigh half
        each. The text is what follows the row's last picture. None when no row claims anything."""
        if self.agreement is None or visual is None or not bool((claims >= 0).any()):
            return None
        rows = (claims >= 0).nonzero().squeeze(1)
        image_index = self.latest_image(input_ids)[rows]
        ids, valid = input_ids[rows], valid[rows]
        last = valid.long().cumsum(1).argmax(1)
        own = image_index[torch.arange(len(rows)), last]
        said = self.is_word(ids) & valid & (image_index == own[:, None]) & (own[:, None] >= 0)
        claimed = said.any(1)  # a row with no words after its picture has no verdict (nor a gradient through one)
        if not bool(claimed.any()):
            return None
        rows, ids, own, said = rows[claimed], ids[claimed], own[claimed], said[claimed]
        reads = self.presence.logits(self._bag_mean(self.phrase_bags(ids)[said]), visual)  # (P, pictures)
        terms = self.agreement.terms(self.llm.embed_tokens(ids[said])[:, None], reads, torch.ones_like(reads, dtype=torch.bool))
        member = said.nonzero()[:, 0][None, :] == torch.arange(len(rows), device=ids.device)[:, None]  # (R, P)
        sums = torch.logsumexp(terms[None].masked_fill(~member[..., None, None], float("-inf")), 1)  # (R, pictures, 2)
        holds = torch.zeros(sums.shape[:2], dtype=torch.bool, device=ids.device)
        holds[torch.arange(len(rows)), own] = claims[rows] == 1
        return balanced_bce(self.agreement.verdict(sums), holds)

    def embed(self, input_ids: torch.Tensor, visual: torch.Tensor | None) -> torch.Tensor:
        embeds = self.llm.embed_tokens(input_ids)
        slots = (input_ids == self.image_token_id).unsqueeze(-1)
        if visual is None or visual.numel() == 0:
            if slots.any():
                raise ValueError("the sequence has <image> slots but no images were given")
            return embeds
        filled = self.to_llm(visual).reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        if int(slots.sum()) != filled.shape[0]:
            raise ValueError(f"{int(slots.sum())} <image> slots but {filled.shape[0]} visual embeddings")
        return embeds.masked_scatter(slots, filled)

    def logits(self, hidden: torch.Tensor, sight: Sight | None = None, copying: Copying | None = None) -> torch.Tensor:
        """Next-token logits (fp32) for hidden states (R, width): the LM head's, the location tokens' from
        the LocationHead, which points into each row's latest image when it has a pointer and `sight`
        (`sight_of`) is given. With a copy head and `copying`, log-probabilities with copied tokens mixed in."""
        logits = self.llm.lm_head(hidden).float()
        if self.location_head is not None:
            logits = logits.index_copy(-1, self.location_ids, self.location_head(hidden, sight))
        if self.copy_head is None or copying is None:
            return logits
        return self.copy_head.mix(logits, hidden, copying, self.llm.embed_tokens.weight)

    def copy_sources(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T): the token that follows each position, where the copy head may copy it; else -1."""
        following = F.pad(input_ids[:, 1:], (0, 1), value=-1)
        return torch.where(torch.isin(following, self.uncopyable), -1, following)

    def pictures_at(self, input_ids: torch.Tensor, patches: torch.Tensor | None) -> torch.Tensor:
        """(B, T) ids and the batch's patch grids (M, P, vision width) -> (B, T, vision width): at each
        position, the latest picture before it as its patches' maximum less the mean picture, at unit length
        (zeros before any), detached. The maximum, as CLIP pools them: an object fills a few patches of a
        blank canvas."""
        width = self.cfg.vision.width
        if patches is None or not patches.numel():
            return torch.zeros(*input_ids.shape, width, device=input_ids.device)
        latest = self.latest_image(input_ids)
        # Detached: the copy head does not train the vision tower, which a pointer's gradient through a
        # hidden layer collapses within the demo's stage 1.
        pooled = patches.detach().float().amax(1)
        if self.training:
            self.picture_mean.lerp_(pooled.mean(0), 0.01)
        # centred: every picture shares its blank canvas, so raw cosines hardly part one shot from another
        pooled = F.pad(F.normalize(pooled - self.picture_mean, dim=-1), (0, 0, 0, 1))  # a last row of zeros: no picture yet
        return pooled[torch.where(latest >= 0, latest, len(patches))]

    def copying_of(self, input_ids: torch.Tensor, hidden: torch.Tensor, patches: torch.Tensor | None, which: torch.Tensor) -> Copying | None:
        """What the copy head may copy at the positions `which` (a (B, T) mask) of a whole sequence: it looks
        at every earlier position and copies the token that followed it. None without a copy head."""
        if self.copy_head is None:
            return None
        steps = torch.arange(input_ids.shape[1], device=input_ids.device)
        allowed = (steps[None, :] < steps[:, None]).expand(len(input_ids), -1, -1)  # j < t: ids[j + 1] is known at t
        same = input_ids[:, :, None] == input_ids[:, None, :]
        pictures = self.pictures_at(input_ids, patches)
        weights = self.copy_head.attend(hidden, self.copy_head.key(hidden), allowed, same, pictures @ pictures.transpose(1, 2))
        rows = which.nonzero()[:, 0]
        return Copying(weights[which], self.copy_sources(input_ids)[rows])

    def sight_of(self, input_ids: torch.Tensor, patches: torch.Tensor | None) -> Sight | None:
        """(B, T) ids and the batch's patch grids (from `see`) -> what the pointer sees at every position."""
        if patches is None:
            return None
        return Sight(patches, self.latest_image(input_ids), self.word_bags(input_ids), self.box_roles(input_ids))

    def forward(
        self,
        input_ids: torch.Tensor,
        visual: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """The LLM's hidden states; the presence probe's reads and the agreement judge's verdict join the words
        after a picture (the verdict at the top too)."""
        embeds = self.embed(input_ids, visual)
        sums = None
        if self.presence is not None and visual is not None:
            told, sums = self.presence_of(input_ids, visual)
            embeds = embeds + told.to(embeds.dtype)
        hidden = self.llm(embeds, positions, mask, cache)
        return hidden if sums is None else hidden + self.agreement.told(sums, at_top=True).to(hidden.dtype)

    def loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        pixels: torch.Tensor,
        regression_weight: float = 1.0,
        target_visual: torch.Tensor | None = None,
        location_sigma: float = 0.0,
        pointer_weight: float = 0.0,
        named_boxes: torch.Tensor | None = None,
        regions: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        claims: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Text CE on labelled positions + regression_weight x L2 to the next visual embedding (weight 1 in a
        batch with no labelled text). With `location_sigma` > 0, a location token's target spreads over its
        neighbouring bins (see `text_loss`); with `pointer_weight` > 0, the text loss also holds that weight x
        `pointer_loss` where boxes are written, and `region_loss` for `regions` (region_ids, region_image,
        region_boxes) when given ("text" in the result; "ce" stays the cross-entropy alone), and
        `agreement_loss` for `claims` (B,) (which rows' text holds in their last picture; `valid` (B, T) the
        rows' real tokens, all when not given).

        Targets are detached, as in Emu; `target_visual` lets training supply them from a slowly moving
        copy of the visual stack (train/targets.py)."""
        visual, patches = self.see(pixels)
        hidden = self(input_ids, visual)
        picked = labels != IGNORE
        sight = self.sight_of(input_ids, patches)
        logits = self.logits(hidden[picked], sight.rows(picked) if sight is not None else None, self.copying_of(input_ids, hidden, patches, picked))
        ce = self.text_loss(logits, labels[picked], location_sigma) if picked.any() else hidden.sum() * 0
        out = {"ce": ce, "text": ce}
        if pointer_weight > 0:
            pointing = {"pointer": self.pointer_loss(hidden, labels, sight, named_boxes)}
            if regions is not None:
                pointing["regions"] = self.region_loss(patches, *regions)
                pointing["presence"] = self.presence_loss(visual, *regions[:2])
            if claims is not None:
                pointing["agreement"] = self.agreement_loss(input_ids, torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid, visual, claims)
            found = {k: v for k, v in pointing.items() if v is not None}
            out.update(found)
            if found:
                out["text"] = ce + pointer_weight * sum(found.values())
        loss = out["text"]
        if visual is not None:
            at, bags, slots = self.regression_rows(input_ids)
            predicted = self.regress(hidden[tuple(at.T)], bags, slots)
            target = (visual if target_visual is None else target_visual).detach()
            l2 = F.mse_loss(predicted.float(), target.reshape(predicted.shape).float())
            # regression_weight trades L2 against CE. A batch with no text target (text-to-image pairs) has no
            # CE to trade against, and at 0.1 its lone L2 teaches the LLM next to nothing.
            weight = regression_weight if picked.any() else 1.0
            out["l2"], out["l2_weight"] = l2, torch.tensor(weight)
            loss = loss + weight * l2
        out["loss"] = loss
        return out

    def regress(self, hidden: torch.Tensor, bags: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        """(R, width) hidden states where a visual embedding is regressed -> (R, visual width); with the word
        bags at each row's `[IMG]` (R, width) and which of the N embeddings it is (R,), the words' part too."""
        out = self.regression_head(hidden.to(self.regression_head.weight.dtype)).float()
        if self.words_to_visual is None or bags is None:
            return out
        by_slot = (bags.detach().float() @ self.words_to_visual.float()).view(len(bags), self.num_queries, -1)
        return out + by_slot[torch.arange(len(bags)), slots]

    def regression_rows(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(B, T) -> where the next visual embedding is regressed (R, 2: row, position), the word bags at
        those images' `[IMG]` (R, width; None without words_to_visual) and which of the N each is (R,)."""
        predicts = F.pad(input_ids[:, 1:] == self.image_token_id, (0, 1))
        steps = torch.arange(input_ids.shape[1], device=input_ids.device)
        slots_before = steps - torch.where(input_ids != self.image_token_id, steps, -1).cummax(1).values  # 0 at [IMG]
        at = predicts.nonzero()
        slots = slots_before[tuple(at.T)]
        if self.words_to_visual is None:
            return at, None, slots
        return at, self.word_bags(input_ids)[at[:, 0], at[:, 1] - slots], slots

    def bin_of(self, location_labels: torch.Tensor) -> torch.Tensor:
        """(R,) ids of location tokens -> (R,) their bin indices k, as floats."""
        return (location_labels[:, None] == self.location_ids).float().argmax(-1).float()

    def pointer_loss(
        self, hidden: torch.Tensor, labels: torch.Tensor, sight: Sight | None, named_boxes: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Cross-entropy of the PatchPointer's attention, where each labelled box is written, against the
        box's share of each patch (its overlap area): the pointer is told which patches the box covers
        instead of finding them through the bins' loss alone. A box is a run of exactly four labelled
        location tokens (x0 y0 x1 y1). `named_boxes` (B, T, 4; NaN where none) adds the boxes of objects
        that texts name (SequenceBuilder.encode's `named`), told at the text's last token: a question
        about one object asks the pointer the same thing as a grounding question. `sight` is `sight_of`
        the batch. A named box trains the pointer alone: its hidden state, words and patches are detached.
        None when the batch has no box after an image."""
        if self.location_head is None or self.location_head.pointer is None or sight is None:
            return None
        rows, boxes = self._written_boxes(labels)
        named = torch.zeros(len(rows), dtype=torch.bool, device=labels.device)
        if named_boxes is not None:
            told = named_boxes[..., 0].isfinite().nonzero()
            rows, boxes = torch.cat([rows, told]), torch.cat([boxes, named_boxes[tuple(told.T)]])
            named = F.pad(named, (0, len(told)), value=True)
        if not len(rows):
            return None
        at = tuple(rows.T)
        keep = sight.image_index[at] >= 0
        if not keep.any():
            return None
        # Reaching the LLM, the embeddings and the tower, the named boxes of the reading batches (one for each
        # one-object caption or question, from the first step) hold off the LLM's reading its pictures.
        asking, looked, named = hidden[at][keep], sight.rows(at).rows(keep), named[keep]
        asking = torch.where(named[:, None], asking.detach(), asking)
        words = torch.where(named[:, None], looked.words.detach(), looked.words) if looked.words is not None else None
        # the patches twice, the second copy detached, which the named rows look at
        patches = torch.cat([looked.patches, looked.patches.detach()])
        image_index = torch.where(named, looked.image_index + len(looked.patches), looked.image_index)
        return self._pointing(asking, Sight(patches, image_index, words, looked.roles), boxes[keep])

    def region_loss(
        self, patches: torch.Tensor | None, region_ids: torch.Tensor, region_image: torch.Tensor, region_boxes: torch.Tensor
    ) -> torch.Tensor | None:
        """The pointer's loss (as `pointer_loss`) for phrases of what boxes of the batch's pictures show
        (SequenceBuilder.collate_regions), asked by the phrase's word bag alone, with no LLM pass: every
        object of every picture teaches the pointer which words mean which patches. In the demo's stage 1,
        texts tell it about one object in a few batches; most of what it must learn is to choose among
        several. None without regions or without a pointer that reads words."""
        if patches is None or not len(region_ids) or not self.reads_words:
            return None
        # Inputs detached: it trains the pointer alone. Reaching the towers and the embeddings as well, its
        # dozens of rows a batch cost the captions much of their quality.
        embeds = self.llm.embed_tokens(region_ids.clamp_min(0)).detach()
        bags = self._weighed(embeds, region_ids >= 0).sum(1)
        return self._pointing(None, Sight(patches.detach(), region_image, bags), region_boxes)

    def _pointing(self, asking: torch.Tensor | None, looked: Sight, boxes: torch.Tensor) -> torch.Tensor | None:
        """Cross-entropy of the pointer's attention against each box's share of each patch, plus (with roles)
        the L1 of its own box; `asking` (R, width) the hidden states that ask, or None for the words alone."""
        pointer = self.location_head.pointer
        target = pointer.box_share(boxes)
        keep = target.sum(-1) > 0
        if not keep.any():
            return None
        looked, boxes, target = looked.rows(keep), boxes[keep], target[keep]
        asking = asking[keep] if asking is not None else None
        attention = pointer.attention(asking, looked.patches, looked.image_index, looked.words)
        loss = -(target * attention.clamp_min(1e-9).log()).sum(-1).mean()
        if not pointer.writes_box:
            return loss
        # Every told box also trains the pointer's own box: L1 in fractions of the image, x10 so that a
        # typical miss (~0.05) weighs about as much as the attention's cross-entropy above it. It trains the
        # pointer alone: reaching the LLM and the towers through its inputs, it cost caption exact match.
        patches, words = looked.patches.detach(), looked.words.detach() if looked.words is not None else None
        asking = asking.detach() if asking is not None else None
        alone = pointer.attention(asking, patches, looked.image_index, words)
        own = pointer.box(pointer.read(patches, looked.image_index, alone), asking, words)
        return loss + 10 * (own - (boxes - 0.5)).abs().mean()

    def _written_boxes(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, 2) the (batch row, position) of each labelled location token in a box, and (R, 4) its box in
        fractions of the image."""
        is_location = torch.isin(labels, self.location_ids)
        window = F.pad(is_location, (1, 4)).unfold(1, 6, 1)  # is_location[t-1 .. t+4] at each t
        starts = (~window[..., 0] & window[..., 1:5].all(-1) & ~window[..., 5]).nonzero()
        rows = starts.repeat_interleave(4, 0)
        rows[:, 1] += torch.arange(4, device=labels.device).repeat(len(starts))
        boxes = self.bin_of(labels[tuple(rows.T)]).reshape(-1, 4) / (len(self.location_ids) - 1)
        return rows, boxes.repeat_interleave(4, 0)

    def text_loss(self, logits: torch.Tensor, labels: torch.Tensor, location_sigma: float) -> torch.Tensor:
        """Mean cross-entropy; with location_sigma > 0, a location token's target is a Gaussian over the bins
        (sigma in bins) around the labelled one, less that target's entropy (a KL, 0 when exactly right, as
        CE is for a word). With one-hot targets a box one pixel off is as wrong as one across the image."""
        per_token = F.cross_entropy(logits, labels, reduction="none")
        is_location = torch.isin(labels, self.location_ids)
        if location_sigma <= 0 or not is_location.any():
            return per_token.mean()
        bins = torch.arange(len(self.location_ids), device=logits.device, dtype=torch.float)
        labelled = self.bin_of(labels[is_location])
        target = torch.softmax(-((bins - labelled[:, None]) ** 2) / (2 * location_sigma**2), dim=-1)
        log_probs = F.log_softmax(logits[is_location], dim=-1)[:, self.location_ids]
        kl = torch.where(target > 0, target * (target.clamp_min(1e-30).log() - log_probs), 0.0)  # far bins' targets underflow to 0
        per_token = per_token.masked_scatter(is_location, kl.sum(-1))
        return per_token.mean()
