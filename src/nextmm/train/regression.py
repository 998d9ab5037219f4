"""The default rule of stage 1: the visual regression never trains the visual stack.

Emu regresses visual embeddings made by the encoder it trains. If the L2 gradient reaches that encoder
(through the LLM's visual inputs), the cheapest way to lower the loss is to make every image's
embeddings alike. Stopping the L2 gradient at the visual embeddings rules that out: the regression
trains the LLM, the projection and the regression head; the vision tower, the layer norm after it (emu.visual_norm)
and the causal resampler learn from text cross-entropy (and stage 0) alone. `pretrain.regression_reaches_visual=true` lifts the rule.
"""

from __future__ import annotations

import torch

from nextmm.models.emu import Emu

VISUAL_STACK = ("vision.", "ln_visual.", "resampler.")


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


class VisualGate:
    """Where the visual stack's outputs leave it (the tower's tokens, the causal transformer's embeddings), a gate
    that passes no gradient while it is shut: the rule above for a sharded model (FSDP), whose parameters in the
    graph are gathered copies that `language_side` cannot name. Shut, it stops the L2 gradient before any of the
    stack, as `backward` does."""

    def __init__(self, model: Emu):
        self.shut = False
        for part in (model.vision, model.resampler):
            part.register_forward_hook(self._gate)

    def _gate(self, module, inputs, output: torch.Tensor) -> None:
        if output.requires_grad:
            output.register_hook(lambda grad: torch.zeros_like(grad) if self.shut else None)


def backward_in_passes(gate: VisualGate, out: dict[str, torch.Tensor], scale: float = 1.0) -> None:
    """`backward`'s gradients in two backward passes over the graph, each reducing gradients like a micro-batch's
    (FSDP accumulates the second onto the first): the L2 loss with the gate shut, then the text loss. Every rank takes
    both passes whenever any rank regresses (global_terms then sets "l2_weight" on all), a rank without an L2 term
    passing zero, since each pass gathers and reduces every block in step with the other ranks."""
    if "l2_weight" in out:
        gate.shut = True
        try:
            l2 = out["l2"] * out["l2_weight"] * scale if "l2" in out else out["text"] * 0
            l2.backward(retain_graph=True)
        finally:
            gate.shut = False
    (out["text"] * scale).backward()
