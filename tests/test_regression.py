"""`pretrain.regression_reaches_visual=false`: the L2 gradient stops at the visual embeddings, so
embeddings of different images stay apart even under pure regression."""

import copy

import numpy as np
import pytest
import torch

from nextmm.api import build_model
from nextmm.data.sample import caption_sample
from nextmm.data.sequence import SequenceBuilder
from nextmm.models.emu import IGNORE
from nextmm.train import regression
from nextmm.worlds.shapes import generator as shapes


def spread(visual: torch.Tensor) -> float:
    """How far images' embeddings sit from their mean, relative to their size (0 = all alike)."""
    flat = visual.flatten(1).float()
    return ((flat - flat.mean(0)).norm(dim=1).mean() / flat.norm(dim=1).mean()).item()


def scene_batch(model, tokenizer, n=24):
    builder = SequenceBuilder(tokenizer, model.num_queries, 64, model.cfg.llm.max_seq_len)
    scenes = [shapes.sample_scene(np.random.default_rng([11, i])) for i in range(n)]
    return builder.collate([builder.encode(caption_sample("k", s.image(), s.caption()).segments) for s in scenes])


def grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


@pytest.fixture(params=["micro", "micro with the paper's layer norm after the tower"])
def model(request, micro_model, micro_config, tokenizer):
    if request.param == "micro":
        return micro_model
    micro_config.emu.visual_norm = True
    torch.manual_seed(0)
    return build_model(micro_config, tokenizer)


def test_l2_trains_the_language_side_and_ce_trains_everything(model, tokenizer):
    micro_model = model
    batch = scene_batch(micro_model, tokenizer, 6)
    loss = lambda: micro_model.loss(batch["input_ids"], batch["labels"], batch["pixels"], 2.0)  # noqa: E731
    out = loss()
    (out["ce"] + 2.0 * out["l2"]).backward()
    both = grads(micro_model)
    micro_model.zero_grad()
    loss()["ce"].backward()
    ce_only = grads(micro_model)
    micro_model.zero_grad()
    regression.backward(micro_model, loss())
    ours = grads(micro_model)
    for name in both:
        expected = ce_only[name] if name.startswith(("vision.", "ln_visual.", "resampler.")) else both[name]  # the visual stack
        torch.testing.assert_close(ours[name], expected, atol=1e-6, rtol=1e-4, msg=name)
    assert any(not torch.equal(both[n], ce_only[n]) for n in both if n.startswith(regression.VISUAL_STACK))
    if micro_model.ln_visual is not None:  # the L2 gradient would reach it through the causal transformer
        assert not torch.equal(both["ln_visual.weight"], ce_only["ln_visual.weight"])


def train_regression_only(model, tokenizer, guarded: bool, steps=80) -> float:
    """The worst case for collapse: no text loss at all, only L2 to the next visual embedding."""
    batch = scene_batch(model, tokenizer)
    labels = torch.full_like(batch["labels"], IGNORE)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        out = model.loss(batch["input_ids"], labels, batch["pixels"])
        if guarded:
            regression.backward(model, out)
        else:
            out["loss"].backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        return spread(model.encode_images(batch["pixels"]))


def test_images_stay_apart_under_pure_regression_where_the_naive_loss_collapses(micro_model, tokenizer):
    naive = copy.deepcopy(micro_model)
    with torch.no_grad():
        start = spread(micro_model.encode_images(scene_batch(micro_model, tokenizer)["pixels"]))
    assert train_regression_only(naive, tokenizer, guarded=False) < 0.3 * start
    assert train_regression_only(micro_model, tokenizer, guarded=True) > 0.9 * start


def test_a_batch_without_text_targets_weighs_its_l2_fully(micro_model, tokenizer):
    batch = scene_batch(micro_model, tokenizer, 4)
    with_text = micro_model.loss(batch["input_ids"], batch["labels"], batch["pixels"], 0.1)
    torch.testing.assert_close(with_text["loss"], with_text["ce"] + 0.1 * with_text["l2"])
    # text-to-image pairs: the caption is context, only the image is predicted, so there is no CE to weigh L2 against
    no_text = micro_model.loss(batch["input_ids"], torch.full_like(batch["labels"], IGNORE), batch["pixels"], 0.1)
    assert float(no_text["l2_weight"]) == 1.0 and float(no_text["ce"].detach()) == 0.0
    torch.testing.assert_close(no_text["loss"], no_text["l2"])
