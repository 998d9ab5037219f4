"""Few-shot evaluation on held-out Shapes World: k solved examples, then the query, in one interleaved
prompt, with the examples chosen at random or by RICES (Yang et al. 2022, as Flamingo uses it: the
support examples whose images are most similar to the query's by CLIP image features).

- captions: k (image, caption) pairs from a support pool, then the query image; exact match and CIDEr;
- vqa: k (image, question, answer) triples, then the query image and question; accuracy;
- binding (the spec's in-context test): each episode binds fresh made-up words to shapes or colours and
  offers a pool of labelled images; k of them are shown, then the query image and `this is a`.

The support pools come from their own seed, so no support example is a query.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from nextmm.api import NextMM
from nextmm.data import shapes
from nextmm.data.sample import Image, Text, vqa_prompt
from nextmm.eval.metrics import caption_scores

SELECTIONS = ("random", "rices")
BINDING_POOL = 8  # labelled images each binding episode offers to choose shots from


def image_features(m: NextMM, images: Sequence) -> torch.Tensor:
    """Unit-length features for RICES: the CLIP stage's, or, for a model without one, the mean of its visual
    embeddings."""
    if m.clip is not None:
        return m.clip_image_features(images)
    return torch.nn.functional.normalize(m.embed_images(images).mean(1), dim=-1)


def choose_shots(query: torch.Tensor, pool: torch.Tensor, k: int, selection: str, rng: np.random.Generator) -> list[list[int]]:
    """Pool indices of k shots per query row. RICES puts the most similar shot last, next to the query."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection '{selection}' is unknown; use one of {', '.join(SELECTIONS)}")
    if k > pool.shape[0]:
        raise ValueError(f"{k} shots asked for but the support pool holds {pool.shape[0]} examples")
    if k == 0:
        return [[] for _ in range(query.shape[0])]
    if selection == "random":
        return [rng.choice(pool.shape[0], size=k, replace=False).tolist() for _ in range(query.shape[0])]
    best = (query @ pool.T).topk(k, dim=1).indices
    return best.flip(1).tolist()


def _scenes(kind: str, seed: int, n: int) -> list:
    return list(shapes.make_samples(kind, seed, n))[:n]


def _image(sample) -> Image:
    return next(seg for seg in sample.segments if isinstance(seg, Image))


def fewshot_captions(m: NextMM, queries: list, pool: list, shots: list[list[int]]) -> dict[str, float]:
    prompts = [sum(([_image(pool[j]), Text(pool[j].segments[1].text, target=False)] for j in chosen), []) + [_image(q)]
               for q, chosen in zip(queries, shots)]
    preds = m.generate(prompts, max_new_tokens=24)
    refs = [q.segments[1].text for q in queries]
    cider = caption_scores(dict(enumerate(preds)), {i: [r] for i, r in enumerate(refs)}, tokenizer="simple", meteor=False)["CIDEr"]
    return {"exact_match": float(np.mean([p.strip() == r for p, r in zip(preds, refs)])), "cider": cider}


def fewshot_vqa(m: NextMM, queries: list, pool: list, shots: list[list[int]]) -> dict[str, float]:
    def solved(s) -> list:
        return [_image(s), Text(vqa_prompt(s.meta["question"]), target=False), Text(s.meta["answer"], target=False)]

    prompts = [sum((solved(pool[j]) for j in chosen), []) + [_image(q), Text(vqa_prompt(q.meta["question"]), target=False)]
               for q, chosen in zip(queries, shots)]
    preds = m.generate(prompts, max_new_tokens=4)
    return {"accuracy": float(np.mean([p.strip() == q.meta["answer"] for p, q in zip(preds, queries)]))}


def fewshot_binding(m: NextMM, n: int, seed: int, k: int, selection: str) -> dict[str, float]:
    """n episodes: fresh words bound to shapes or colours, a pool of BINDING_POOL labelled images, k shown."""
    rng = np.random.default_rng([seed, k, 7])
    episodes = [shapes.binding_episode(np.random.default_rng([seed, i, 9]), BINDING_POOL) for i in range(n)]
    prompts = []
    for pool, (query, answer) in episodes:
        features = image_features(m, [img for img, _ in pool] + [query])
        (chosen,) = choose_shots(features[-1:], features[:-1], k, selection, rng)
        shown = sum(([Image(pool[j][0]), Text(f"this is a {pool[j][1]}", target=False)] for j in chosen), [])
        prompts.append(shown + [Image(query), Text("this is a", target=False)])
    preds = m.generate(prompts, max_new_tokens=4)
    answers = [answer for _, (_, answer) in episodes]
    return {"accuracy": float(np.mean([p.split()[:1] == [a] for p, a in zip(preds, answers)]))}


def evaluate_fewshot(
    m: NextMM, n: int = 100, shots: Sequence[int] = (0, 2, 4, 8), selections: Sequence[str] = SELECTIONS,
    seed: int = 10_007, progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """{task: {selection: {shots: score}}} for captions, VQA and binding (binding needs at least one shot)."""
    support_seed = seed + 1
    results: dict[str, Any] = {"captions": {}, "vqa": {}, "binding": {}}
    for task, kind in (("captions", "caption"), ("vqa", "vqa")):
        queries, pool = _scenes(kind, seed, n), _scenes(kind, support_seed, 4 * n)
        q_feats, p_feats = (image_features(m, [_image(s).image for s in samples]) for samples in (queries, pool))
        run = fewshot_captions if task == "captions" else fewshot_vqa
        for selection in selections:
            rng = np.random.default_rng([seed, 3])
            for k in shots:
                progress(f"{task}, {selection}, {k} shots")
                score = run(m, queries, pool, choose_shots(q_feats, p_feats, k, selection, rng))
                results[task].setdefault(selection, {})[k] = {key: round(v, 4) for key, v in score.items()}
    for selection in selections:
        for k in [k for k in shots if k > 0]:
            progress(f"binding, {selection}, {k} shots")
            score = fewshot_binding(m, n, seed, min(k, BINDING_POOL), selection)
            results["binding"].setdefault(selection, {})[k] = {key: round(v, 4) for key, v in score.items()}
    return results
