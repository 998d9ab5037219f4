import numpy as np
import pytest
import torch

from nextmm.api import NextMM, build_model
from nextmm.config import make_config
from nextmm.data.sample import Text
from nextmm.tokenizer import NextTokenizer
from nextmm.worlds.shapes import generator as shapes


def shapes_texts(n: int = 300) -> list[str]:
    texts = []
    for kind in ("caption", "vqa", "video_qa", "binding"):
        for sample in shapes.make_samples(kind, 0, n // 4):
            texts += [seg.text for seg in sample.segments if isinstance(seg, Text)]
    return texts


@pytest.fixture(scope="session")
def tokenizer() -> NextTokenizer:
    return NextTokenizer.train(shapes_texts(), vocab_size=320, location_bins=64)


@pytest.fixture()
def micro_config(tokenizer):
    cfg = make_config("micro")
    cfg.llm.vocab_size = tokenizer.vocab_size
    return cfg


@pytest.fixture()
def micro_model(micro_config, tokenizer):
    torch.manual_seed(0)
    return build_model(micro_config, tokenizer)


@pytest.fixture()
def micro_nextmm(micro_model, tokenizer, micro_config) -> NextMM:
    return NextMM(micro_model, tokenizer, micro_config)


@pytest.fixture(scope="session")
def chatty(tokenizer) -> NextMM:
    """A micro model with a tiny visual decoder whose LLM is moved by N(0, 0.3), so that its greedy replies change from
    token to token: a model that writes one token over and over would hide rows that read each other's tokens."""
    from nextmm.models.decoder import VisualDecoder

    cfg = make_config("micro")
    cfg.llm.vocab_size = tokenizer.vocab_size
    cfg.decoder.sample_steps = 2
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("llm."):
                param.add_(torch.randn_like(param) * 0.3)
    decoder = VisualDecoder(cfg.decoder, cfg.resampler.width, cfg.resampler.num_queries, semantic_width=cfg.clip_text.embed_dim)
    return NextMM(model, tokenizer, cfg, decoder=decoder)


@pytest.fixture()
def scenes():
    return [shapes.sample_scene(np.random.default_rng([3, i])) for i in range(8)]
