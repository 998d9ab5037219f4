"""The default rule of stage 1: the visual regression never trains the visual stack.

Emu regresses visual embeddings made by the encoder it trains. If the L2 gradient reaches that encoder
(through the LLM's visual inputs), the cheapest way to lower the loss is to make every image's
embeddings alike. Stopping the L2 gradient at the visual embeddings rules that out: the regression
trains the LLM, the projection and the regression head; the vision tower and the causal resampler learn
from text cross-entropy (and stage 0) alone. `pretrain.regression_reaches_visual=true` lifts the rule.
"""

from __future__ import annotations

import torch

from nextmm.models.emu import Emu

VISUAL_STACK = ("vision.", "resampler.")


def language_side(model: Emu) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(VISUAL_STACK)]


def backward(model: Emu, out: dict[str, torch.Tensor], scale: float = 1.0, one_pass: bool = False) -> None:
    """Accumulate gradients of scale x (text + weight x L2), the weight Emu.loss chose, the L2 part stopping at
    the visual embeddings. Two passes over one graph, each filling one side's parameters: the whole loss for the
    language side, then the text loss (CE, and the heads' terms) for the visual stack alone. The second pass
    computes no gradient of the LLM's weights, only of its activations on the way down to the pictures: about
    half of what a second full backward through the LLM would cost.

    `one_pass` (under DistributedDataParallel): the L2 gradients join the text loss's backward as more roots of
    it rather than being added to `.grad` afterwards, because DDP all-reduces a gradient as autograd accumulates
    it, and one added by hand afterwards would stay this process's own. The L2 loss itself is a root too, with a
    zero gradient: DDP waits for a gradient of every parameter the forward reached, and where no labelled word
    follows a picture the text loss reaches no part of the visual stack."""
    if "l2" not in out:
        (out["text"] * scale).backward()
        return
    params = language_side(model)
    if one_pass:
        grads = torch.autograd.grad(out["l2"] * out["l2_weight"] * scale, params, retain_graph=True, allow_unused=True)
        reached = [(param, grad) for param, grad in zip(params, grads) if grad is not None]
        roots = [out["text"] * scale, out["l2"], *(p for p, _ in reached)]
        torch.autograd.backward(roots, [None, torch.zeros_like(out["l2"]), *(g for _, g in reached)])
        return
    visual = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith(VISUAL_STACK)]
    if params:
        (out["loss"] * scale).backward(inputs=params, retain_graph=bool(visual))
    if visual:
        (out["text"] * scale).backward(inputs=visual)
