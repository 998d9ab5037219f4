"""Which side of the location pointer keeps it from finding the named object: the question (the LLM's
hidden state where x0 is written) or the picture (the image encoder's patch grid)?

For grounding questions about scenes of `--objects` objects, this takes both from a saved model, frozen,
and fits a fresh attention (a query from one side, a key from the other, as PatchPointer's) to the
boxes' patches with the pointer's own loss (Emu.pointer_loss's target). It reports the attention's share
on the named object's patches for held-out questions, with the query read from:
- `hidden`: the LLM's hidden state, as the model's pointer reads it;
- `name`: the object phrase itself, one-hot (colour, shape, size), what a perfect LLM could carry;
and the key read from the patch grid by a linear map (as PatchPointer's) or through a hidden layer
(`_mlp`). Beside them, the model's own pointer on the same questions.

Usage: python research/pointer_naming.py --model runs/demo/model [--objects 2]
Prints one JSON object.
"""

import argparse
import json

import torch
from torch import nn

import nextmm
from nextmm.heads.location import Pointing
from nextmm.worlds.shapes.generator import COLOURS, SHAPES
from grounding_probe import prefilled, questions

FIT, HELD_OUT = 1200, 300


@torch.no_grad()
def hidden_and_patches(m, prompts: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The hidden states where x0 is written, the patch grids, and the word bags there (None if not read)."""
    hidden, patches, words = [], [], []
    for _, stepper, state in prefilled(m, prompts):
        hidden.append(state)
        sight = next(s for s in stepper.states if isinstance(s, Pointing)).sight
        patches.append(sight.patches.float())
        words.append(sight.words)
    return torch.cat(hidden), torch.cat(patches), (torch.cat(words) if words[0] is not None else None)


def named(phrase: str) -> torch.Tensor:
    """An object phrase ("a large red circle"), one-hot: colour, shape, size."""
    _, size, colour, shape = phrase.split()
    code = torch.zeros(len(COLOURS) + len(SHAPES) + 2)
    code[list(COLOURS).index(colour)] = 1
    code[len(COLOURS) + SHAPES.index(shape)] = 1
    code[-1 if size == "large" else -2] = 1
    return code


def share_on_object(attention: torch.Tensor, target: torch.Tensor) -> float:
    return round(float((attention * (target > 0)).sum(1).mean()), 3)


def fitted_share(queries: torch.Tensor, patches: torch.Tensor, target: torch.Tensor, key_hidden: int, steps: int) -> float:
    torch.manual_seed(0)
    query = nn.Linear(queries.shape[1], 64, bias=False)
    key = nn.Sequential(nn.Linear(patches.shape[2], key_hidden), nn.GELU(), nn.Linear(key_hidden, 64)) if key_hidden else nn.Linear(patches.shape[2], 64, bias=False)
    optimizer = torch.optim.Adam([*query.parameters(), *key.parameters()], lr=3e-3)

    def attention(rows: slice) -> torch.Tensor:
        return torch.softmax(torch.einsum("rk,rpk->rp", query(queries[rows]), key(patches[rows])) / 8, -1)

    fit, held_out = slice(0, FIT), slice(FIT, None)
    for _ in range(steps):  # full batch: the fit is cheap next to the forward passes that made its inputs
        loss = -(target[fit] * attention(fit).clamp_min(1e-9).log()).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return share_on_object(attention(held_out), target[held_out])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--objects", type=int, default=2, choices=(1, 2, 3))
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    m = nextmm.load(args.model)
    pointer = getattr(m.model.heads.location if "location" in m.model.heads else None, "pointer", None)
    if pointer is None:
        raise SystemExit(f"the model in {args.model} has no location pointer (heads.pointer); nothing to probe")
    prompts, phrases, boxes = questions(FIT + HELD_OUT, args.objects)
    hidden, patches, words = hidden_and_patches(m, prompts)
    target = pointer.box_share(torch.tensor(boxes, dtype=torch.float) / m.config.vision.image_size)
    with torch.no_grad():
        own = pointer.attention(hidden[FIT:], patches[FIT:], torch.arange(HELD_OUT), words[FIT:] if words is not None else None)
    names = torch.stack([named(phrase) for phrase in phrases])
    out = {"model": args.model, "objects": args.objects, "steps": args.steps, "the_models_pointer": share_on_object(own, target[FIT:])}
    for query_name, queries in (("hidden", hidden), ("name", names)):
        for key_name, key_hidden in (("linear", 0), ("mlp", 128)):
            out[f"{query_name}_x_{key_name}"] = fitted_share(queries, patches, target, key_hidden, args.steps)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
