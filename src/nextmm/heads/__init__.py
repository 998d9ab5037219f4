"""Extra heads beside the paper's Emu, each in its own file behind one interface (heads/base.py), switched on by
the config's `heads` section. `heads_for` builds those a config asks for."""

from __future__ import annotations

from nextmm.config import Config
from nextmm.heads.agreement import AgreementJudge
from nextmm.heads.base import Heads
from nextmm.heads.copy import CopyHead
from nextmm.heads.location import location_head_for
from nextmm.heads.presence import PresenceProbe
from nextmm.heads.words_to_visual import WordsToVisual

# Where models saved before the heads had their own section keep each head's weights: old prefix -> new.
OLD_NAMES = {"location_head.": "heads.location.", "copy_head.": "heads.copy.", "picture_mean": "heads.copy.picture_mean",
             "presence.": "heads.presence.", "agreement.": "heads.agreement.", "words_to_visual": "heads.words_to_visual.weight"}


def heads_for(cfg: Config, image_id: int, location_ids: list[int] = (), special_ids: list[int] = ()) -> Heads:
    """The heads `cfg.heads` switches on, in the order their hooks run. The presence probe and words-to-visual
    read the words the location pointer weighs, and the agreement judge weighs the probe's reads: each is built
    only when what it reads is."""
    heads, width = {}, cfg.llm.width
    location = location_head_for(cfg, len(location_ids))
    if location is not None:
        heads["location"] = location
    if cfg.heads.copy:
        heads["copy"] = CopyHead(width, cfg.vision.width)
    reads_words = location is not None and location.reads_words
    if cfg.heads.presence and reads_words:
        heads["presence"] = PresenceProbe(width, cfg.visual_width)
        if cfg.heads.agreement:
            heads["agreement"] = AgreementJudge(width)
    if cfg.heads.words_to_visual and reads_words:
        heads["words_to_visual"] = WordsToVisual(width, cfg.resampler.num_queries, cfg.visual_width)
    return Heads(heads, image_id, location_ids, special_ids)


def renamed(state_dict: dict, prefix: str = "") -> None:
    """Moves an old model's head weights (saved at the model's top level) to where the heads keep them, in place."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        name = key[len(prefix):]
        old = next((o for o in OLD_NAMES if name.startswith(o) and (o.endswith(".") or name == o)), None)
        if old is not None:
            state_dict[prefix + OLD_NAMES[old] + name[len(old):]] = state_dict.pop(key)
