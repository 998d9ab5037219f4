"""Few-shot evaluation on held-out Shapes World: k solved examples, then the query, in one interleaved
prompt, with the examples chosen at random or by RICES (Yang et al. 2022, as Flamingo uses it: the
support examples whose images are most similar to the query's by CLIP image features).

- captions: k (image, caption) pairs from a support pool, then the query image; exact match and CIDEr;
- vqa: k (image, question, answer) triples, then the query image and question; accuracy;
- binding (the spec's in-context test): each episode binds fresh made-up words to shapes or colours and
  offers a pool of labelled images; k of them are shown, then the query image and `this is a`; the next
  word is scored as written and as a choice among the words the shots showed, beside that choice's chance.

The support pools come from their own seed, so no support example is a query.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from nextmm.api import NextMM
from nextmm.data.sample import Image, Text, vqa_prompt
from nextmm.eval.metrics import caption_scores
from nextmm.worlds.shapes import generator as shapes

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


class SupportSet:
    """Solved examples to put before queries: each a picture and the segments that show it solved (the
    picture first). RICES features of the pool are computed once, on first use."""

    def __init__(self, m: NextMM, pictures: list, solved: list[list], seed: int = 0):
        if len(pictures) != len(solved) or not solved:
            raise ValueError("a support set needs one solved example per picture, and at least one")
        self.m, self.pictures, self.solved = m, pictures, solved
        self.rng = np.random.default_rng(seed)
        self._features: torch.Tensor | None = None

    def prompts(self, queries: list, tails: list[list], k: int, selection: str) -> list[list]:
        """For each query picture: k solved examples, then the picture and its tail (e.g. the question)."""
        if selection == "rices" and k:
            if self._features is None:
                self._features = image_features(self.m, self.pictures)
            query, pool = image_features(self.m, queries), self._features
        else:  # random choice needs only the sizes
            query, pool = torch.empty(len(queries), 0), torch.empty(len(self.solved), 0)
        chosen = choose_shots(query, pool, k, selection, self.rng)
        return [sum((self.solved[j] for j in shots), []) + [Image(q)] + tail for q, tail, shots in zip(queries, tails, chosen)]

    def caption(self, pictures: list, k: int, selection: str, max_new_tokens: int = 24) -> list[str]:
        """A caption of each picture, written after k solved examples."""
        return self.m.generate(self.prompts(pictures, [[] for _ in pictures], k, selection), max_new_tokens=max_new_tokens)

    def ask(self, pictures: list, questions: list[str], k: int, selection: str, max_new_tokens: int = 8,
            answers: Sequence[str] | None = None) -> list[str]:
        """An answer to each (picture, question), written after k solved examples; with `answers`, one of those."""
        tails = [[Text(vqa_prompt(q), target=False)] for q in questions]
        return self.m.generate(self.prompts(pictures, tails, k, selection), max_new_tokens=max_new_tokens, answers=answers)


def caption_support(m: NextMM, pictures: list, captions: list[str], seed: int = 0) -> SupportSet:
    return SupportSet(m, pictures, [[Image(p), Text(c, target=False)] for p, c in zip(pictures, captions)], seed)


def vqa_support(m: NextMM, pictures: list, questions: list[str], answers: list[str], seed: int = 0) -> SupportSet:
    solved = [[Image(p), Text(vqa_prompt(q), target=False), Text(a, target=False)] for p, q, a in zip(pictures, questions, answers)]
    return SupportSet(m, pictures, solved, seed)


def _picture(sample) -> Any:
    return next(seg.image for seg in sample.segments if isinstance(seg, Image))


def fewshot_captions(m: NextMM, queries: list, support: SupportSet, k: int, selection: str) -> dict[str, float]:
    preds = support.caption([_picture(q) for q in queries], k, selection, max_new_tokens=24)
    refs = [q.segments[1].text for q in queries]
    cider = caption_scores(dict(enumerate(preds)), {i: [r] for i, r in enumerate(refs)}, tokenizer="simple", meteor=False)["CIDEr"]
    return {"exact_match": float(np.mean([p.strip() == r for p, r in zip(preds, refs)])), "cider": cider}


def fewshot_vqa(m: NextMM, queries: list, support: SupportSet, k: int, selection: str) -> dict[str, float]:
    preds = support.ask([_picture(q) for q in queries], [q.meta["question"] for q in queries], k, selection, max_new_tokens=4)
    return {"accuracy": float(np.mean([p.strip() == q.meta["answer"] for p, q in zip(preds, queries)]))}


def fewshot_binding(m: NextMM, n: int, seed: int, k: int, selection: str) -> dict[str, float]:
    """n episodes: fresh words bound to shapes or colours, a pool of BINDING_POOL labelled images, k shown."""
    prompts, answers = [], []
    for i in range(n):
        pool, (query, answer) = shapes.binding_episode(np.random.default_rng([seed, i, 9]), BINDING_POOL)
        support = SupportSet(m, [p for p, _ in pool], [[Image(p), Text(f"this is a {w}", target=False)] for p, w in pool], seed + i)
        prompts += support.prompts([query], [[Text("this is a", target=False)]], k, selection)
        answers.append(answer)
    return binding_scores(m, prompts, answers)


def binding_scores(m: NextMM, prompts: list[list], answers: list[str]) -> dict[str, float]:
    """Binding prompts scored two ways: `accuracy`, the next word written freely (the spec's test), and
    `choice_accuracy`, the word chosen among those the prompt's shots showed (trie-constrained), beside
    `chance`, what a uniform guess among them scores (0 where the shots never show the query's word)."""
    choices = [shapes.binding_choices(p) for p in prompts]
    written = m.generate(prompts, max_new_tokens=4)
    chosen = m.generate(prompts, answers=choices)
    return {
        "accuracy": float(np.mean([w.split()[:1] == [a] for w, a in zip(written, answers)])),
        "choice_accuracy": float(np.mean([c == a for c, a in zip(chosen, answers)])),
        "chance": float(np.mean([(a in words) / len(words) for words, a in zip(choices, answers)])),
    }


def evaluate_fewshot(
    m: NextMM, n: int = 100, shots: Sequence[int] = (0, 2, 4, 8), selections: Sequence[str] = SELECTIONS,
    seed: int = 10_007, progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """{task: {selection: {shots: score}}} for captions, VQA and binding (binding needs at least one shot)."""
    support_seed = seed + 1
    results: dict[str, Any] = {"captions": {}, "vqa": {}, "binding": {}}
    for task, kind in (("captions", "caption"), ("vqa", "vqa")):
        queries = list(shapes.make_samples(kind, seed, n))[:n]
        pool = list(shapes.make_samples(kind, support_seed, 4 * n))[:4 * n]
        pictures = [_picture(s) for s in pool]
        if task == "captions":
            support, run = caption_support(m, pictures, [s.segments[1].text for s in pool], seed), fewshot_captions
        else:
            support, run = vqa_support(m, pictures, [s.meta["question"] for s in pool], [s.meta["answer"] for s in pool], seed), fewshot_vqa
        for selection in selections:
            for k in shots:
                progress(f"{task}, {selection}, {k} shots")
                score = run(m, queries, support, k, selection)
                results[task].setdefault(selection, {})[k] = {key: round(v, 4) for key, v in score.items()}
    for selection in selections:
        for k in [k for k in shots if k > 0]:
            progress(f"binding, {selection}, {k} shots")
            score = fewshot_binding(m, n, seed, min(k, BINDING_POOL), selection)
            results["binding"].setdefault(selection, {})[k] = {key: round(v, 4) for key, v in score.items()}
    return results
