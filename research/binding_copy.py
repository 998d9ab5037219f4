"""The spec's binding test on held-out 4-shot prompts (the word written, the word chosen among those
shown, chance: `nextmm eval shapes`'s scores), and where the copy head looks there: at the query's
`this is a`, which of the words the shots showed gets the most copy attention, which the LM head alone
prefers, which the mixture prefers, and the gate's median. Beside them, an attribute matcher that knows
every picture's colour and shape and picks the word of the shown picture sharing the most attributes with
the query (ties split): what matching pictures can reach on these prompts. And how far pictures' cosines
alone go (the word of the shown picture most like the query's): by the vision tower's patches' maximum
(what the copy head reads), the same less these prompts' mean picture (the copy head centres on a mean
kept in training), and the mean visual embedding (what session 17's copy head read); with the median gap
between the answer's best cosine and the best other word's, which says how sharp a fixed weight on the
cosine can be. And, with the answer's tokens given (as training sees them), per token of the answer:
the gate's median and the median probability of the right token, since a word cut short after its
second syllable is a gate closing there.

Usage: python research/binding_copy.py --model runs/demo/model [--prompts 200]
Prints one JSON object."""

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

import nextmm
from nextmm.data.sample import Text
from nextmm.generate import Stepper
from nextmm.heads.copy import Recall, copy_sources
from nextmm.worlds.shapes import generator as shapes
from nextmm.worlds.shapes.evaluation import EVAL_SEED, evaluate_binding

SEED, SHOTS = EVAL_SEED, 4


def episode(i: int):
    """The eval's prompt (segments, answer, query object) and the shots' objects, drawn as the eval draws them."""
    segments, answer, _, query = shapes._binding_fewshot(np.random.default_rng([SEED, i, SHOTS]), SHOTS)
    rng = np.random.default_rng([SEED, i, SHOTS])
    words = shapes._fresh_words(rng, int(rng.integers(2, 5)))
    _, objects = shapes._binding_pairs(rng, words, shapes._bindings(rng, words), SHOTS, target=False)
    return segments, answer, query, objects


def shown_words(segments, shots: int) -> list[str]:
    return [s.text.rsplit(" ", 1)[1] for s in segments if isinstance(s, Text) and s.text.startswith("this is a ")][:shots]


def matcher_right(segments, answer, query, objects) -> float:
    shared = {}
    for o, word in zip(objects, shown_words(segments, len(objects))):
        shared[word] = max(shared.get(word, 0), (o.colour == query.colour) + (o.shape == query.shape))
    best = [w for w, v in shared.items() if v == max(shared.values())]
    return (answer in best) / len(best)


def cosine_choice(features: torch.Tensor, words: list[str], answer: str) -> tuple[bool, float]:
    """features (shots + 1, D), the query's last -> (the most alike shot's word is the answer, its margin)."""
    unit = F.normalize(features.float(), dim=-1)
    best: dict[str, float] = {}
    for word, cosine in zip(words, (unit[:-1] @ unit[-1]).tolist()):
        best[word] = max(best.get(word, -2.0), cosine)
    others = [v for w, v in best.items() if w != answer]
    return max(best, key=best.get) == answer, best[answer] - max(others) if others else float("nan")


def cosine_scores(pictures: list[tuple[list[str], str, dict]]) -> dict[str, float]:
    mean = torch.cat([features["patch_max"] for _, _, features in pictures]).mean(0)
    report = {}
    for name, source, centre in (("patch_max", "patch_max", 0), ("patch_max_centred", "patch_max", mean), ("visual_mean", "visual_mean", 0)):
        chosen = [cosine_choice(features[source] - centre, words, answer) for words, answer, features in pictures]
        report[f"cosine_{name}_right"] = round(float(np.mean([right for right, _ in chosen])), 3)
        report[f"cosine_{name}_median_margin"] = round(float(np.nanmedian([margin for _, margin in chosen])), 3)
    return report


@torch.no_grad()
def by_answer_token(m, episodes: list) -> dict[str, list[float]]:
    """For each token of the answer (first, second, ...): the gate's median and the median probability of
    the right token, the answer's tokens given as training gives them."""
    model, found = m.model, {}
    for segments, answer, _, _ in episodes:
        batch = m.builder.collate([m.builder.encode(segments, close=False)], left_pad=True)
        written = m.tokenizer.encode(f"this is a {answer}")[len(m.tokenizer.encode("this is a")):]
        ids = torch.cat([batch["input_ids"], torch.tensor([written])], 1)
        visual, patches = model.see(batch["pixels"])
        reading = model.read(ids, visual, patches)
        hidden = model(ids, visual, reading=reading)
        asking = torch.zeros_like(ids, dtype=torch.bool)
        asking[0, -len(written) - 1:-1] = True  # the positions that write each token of the answer
        copying = model.heads.copy.copying(reading, hidden, asking)
        embeddings = model.llm.embed_tokens.weight
        gate = model.heads.copy.opening(hidden[asking], model.heads.copy.copied(copying, len(embeddings)), embeddings)[:, 0]
        right = model.logits(hidden, reading, asking).softmax(-1)[torch.arange(len(written)), written]
        for k, (g, p) in enumerate(zip(gate.tolist(), right.tolist())):
            found.setdefault(k, []).append((g, p))
    return {"gate_median_by_answer_token": [round(float(np.median([g for g, _ in v])), 3) for _, v in sorted(found.items())],
            "p_right_median_by_answer_token": [round(float(np.median([p for _, p in v])), 3) for _, v in sorted(found.items())],
            "answers_by_length": [len(v) for _, v in sorted(found.items())]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", type=int, default=200)
    args = parser.parse_args()
    m = nextmm.load(args.model)
    model = m.model.eval()
    if "copy" not in model.heads:
        raise SystemExit(f"{args.model} has no copy head (heads.copy)")
    scores = {"copy_attention_right": [], "lm_head_right": [], "mixed_right": [], "gate": [], "attribute_matcher_right": []}
    pictures, shown = [], []
    for i in range(args.prompts):
        segments, answer, query, objects = episode(i)
        words = shapes.binding_choices(segments)
        if answer not in words:
            continue
        shown.append((segments, answer, query, objects))
        batch = m.builder.collate([m.builder.encode(segments, close=False)], left_pad=True)
        with torch.no_grad():
            stepper = Stepper(model, batch, 1, True, "fp32")
            hidden = stepper.prefill()
            recall = next(state for state in stepper.states if isinstance(state, Recall))
            copying = recall.copying(hidden)
            attention = copying.weights[0]
            lm = model.logits(hidden)
            for state in (state for state in stepper.states if state is not recall):  # every head's but the copy head's
                lm = state.logits(hidden, lm)
            lm = lm[0]
            mixed = stepper.logits(hidden)[0]
            embeddings = model.llm.embed_tokens.weight
            gate = model.heads.copy.opening(hidden, model.heads.copy.copied(copying, len(embeddings)), embeddings).item()
            visual, patches = model.see(batch["pixels"])
        pictures.append((shown_words(segments, len(objects)), answer, {"patch_max": patches.amax(1), "visual_mean": visual.mean(1)}))
        first = {w: m.tokenizer.encode(w)[0] for w in words}
        on_word = {w: attention[copy_sources(recall.read_ids, model.heads.uncopyable)[0] == t].sum().item() for w, t in first.items()}
        scores["copy_attention_right"].append(max(on_word, key=on_word.get) == answer)
        scores["lm_head_right"].append(max(first, key=lambda w: lm[first[w]].item()) == answer)
        scores["mixed_right"].append(max(first, key=lambda w: mixed[first[w]].item()) == answer)
        scores["gate"].append(gate)
        scores["attribute_matcher_right"].append(matcher_right(segments, answer, query, objects))
    report = {"model": args.model, **evaluate_binding(m, args.prompts, SEED, SHOTS)}
    report.update({"prompts_with_the_answer_shown": len(scores["gate"]), "gate_median": round(float(np.median(scores.pop("gate"))), 3)})
    report.update({k: round(float(np.mean(v)), 3) for k, v in scores.items()})
    report.update(cosine_scores(pictures))
    report.update(by_answer_token(m, shown))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
