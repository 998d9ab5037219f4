"""nextmm: generative pretraining in multimodality — one model that reads interleaved text, images and
video and predicts the next element (the Emu design)."""

from nextmm.api import NextMM, load

__all__ = ["NextMM", "load"]
__version__ = "0.1.0"
