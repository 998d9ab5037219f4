"""Benchmark metrics as the benchmarks' own toolkits define them, so our numbers compare with published ones.

- VQA accuracy: the VQAv2 evaluation's rules (answer normalisation, min(1, matches / 3) averaged over the
  ten leave-one-out subsets of the human answers), reimplemented because the official script is not a
  package; tests check it against hand-computed cases.
- Caption metrics: pycocoevalcap itself (BLEU-4, METEOR, ROUGE-L, CIDEr). Its PTB tokenizer and METEOR
  run on Java; without Java the captions are tokenized by `simple_tokenize` and METEOR is left out,
  which the result says.
- Retrieval Recall@K both ways, grounding accuracy at IoU >= 0.5, the Frechet distance (FID) between
  two feature sets, and the CLIP score.
"""

from __future__ import annotations

import re
import shutil
from collections import defaultdict
from typing import Hashable, Sequence

import numpy as np
import torch

from nextmm.errors import UserError


class MetricInputError(UserError, ValueError):
    """Inputs a metric cannot score: no predictions, predictions without references, too few features."""

# ---- VQA -----------------------------------------------------------------------------------------------

_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_LONE_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern, its typo included: it strips "." not before a digit
_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())} | {"none": "0"}
_ARTICLES = {"a", "an", "the"}
# The official map restores apostrophes to contractions typed without them; these are its entries.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered":
    "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}


def _strip_punctuation(text: str) -> str:
    out = text
    for mark in _PUNCTUATION:
        # A mark beside a space (or any answer with a comma inside a number) is deleted, else it splits words.
        if f"{mark} " in text or f" {mark}" in text or _COMMA_IN_NUMBER.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _LONE_PERIOD.sub("", out)


def _digits_and_articles(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split() if _NUMBER_WORDS.get(w, w) not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """A predicted answer as the VQA evaluation compares it: "Two dogs." -> "2 dogs"."""
    return _digits_and_articles(_strip_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """One question's VQA accuracy: over each leave-one-out subset of the human answers, min(1, the
    number that match the prediction / 3); their mean. The human answers are stripped of punctuation only
    when they disagree, as the official evaluation does."""
    if not human_answers:
        raise MetricInputError("a VQA question needs at least one human answer")
    predicted = normalize_answer(prediction)
    answers = list(human_answers)
    if len(set(answers)) > 1:
        answers = [_strip_punctuation(a) for a in answers]
    scores = [min(1.0, sum(a == predicted for j, a in enumerate(answers) if j != i) / 3) for i in range(len(answers))]
    return sum(scores) / len(scores)


def vqa_scores(predictions: dict[Hashable, str], questions: dict[Hashable, dict]) -> dict:
    """Overall, per question type and per answer type VQA accuracy in percent (two decimals, as the official
    evaluation prints them). `questions[id]` holds "answers" (the human answers) and optionally
    "question_type" and "answer_type"."""
    overall: list[float] = []
    by_question: dict[str, list[float]] = defaultdict(list)
    by_answer: dict[str, list[float]] = defaultdict(list)
    for qid, prediction in predictions.items():
        q = questions[qid]
        score = vqa_accuracy(prediction, q["answers"])
        overall.append(score)
        by_question[q.get("question_type", "all")].append(score)
        by_answer[q.get("answer_type", "all")].append(score)
    percent = lambda xs: round(100 * sum(xs) / len(xs), 2)  # noqa: E731
    return {
        "overall": percent(overall),
        "per_question_type": {k: percent(v) for k, v in sorted(by_question.items())},
        "per_answer_type": {k: percent(v) for k, v in sorted(by_answer.items())},
        "questions": len(overall),
    }


# ---- captions ------------------------------------------------------------------------------------------

# The punctuation tokens pycocoevalcap drops after PTB (its "-LRB-"-style entries never match PTB's
# lower-cased output, so brackets stay, renamed), plus a plain double quote, which PTB turns into `` or ''.
_DROPPED = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'}
_RENAMED = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_LEADING = set("\"'`([{$")
_TRAILING = set("\"'`)]}.,;:!?%")
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")


def _ptb_pieces(chunk: str) -> list[str]:
    lead, trail = [], []
    while chunk and chunk[0] in _LEADING:
        lead.append(chunk[0])
        chunk = chunk[1:]
    # an ellipsis is one token; a final period stays on an abbreviation with periods inside ("u.s.")
    while chunk and chunk[-1] in _TRAILING and not (chunk[-1] == "." and "." in chunk[:-1] and not chunk.endswith("...")):
        piece = "..." if chunk.endswith("...") else chunk[-1]
        trail.insert(0, piece)
        chunk = chunk[: -len(piece)]
    clitic = _CLITIC.match(chunk)
    middle = [clitic.group(1), clitic.group(2)] if clitic else [chunk] if chunk else []
    return lead + middle + trail


def simple_tokenize(caption: str) -> str:
    """The fallback when Java is missing, PTB's rules for ordinary captions: lower case; leading and
    trailing punctuation, "$" and "%" split off ("$5" -> "$ 5"); clitics split ("dog's" -> "dog 's",
    "don't" -> "do n't"); hyphens, slashes and inner periods kept ("e-mail", "u.s.", "3.5"); brackets
    renamed as PTB names them ("(" -> "-lrb-"); then pycocoevalcap's punctuation tokens dropped."""
    pieces = [piece for chunk in caption.lower().split() for piece in _ptb_pieces(chunk)]
    return " ".join(_RENAMED.get(p, p) for p in pieces if p not in _DROPPED)


def java_available() -> bool:
    return shutil.which("java") is not None


def caption_scores(
    predictions: dict[Hashable, str], references: dict[Hashable, list[str]], tokenizer: str = "auto", meteor: bool = True
) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr (pycocoevalcap's scorers) of one predicted caption per id against
    its reference captions. tokenizer: "ptb" (Stanford PTBTokenizer, Java, as COCO's server), "simple"
    (`simple_tokenize`), or "auto" (ptb when Java is installed). METEOR needs Java (and ~20 s to start);
    without Java, or with meteor=False, it is None."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    missing = [k for k in predictions if not references.get(k)]
    if missing:
        raise MetricInputError(f"{len(missing)} predictions have no reference captions (first: {missing[0]!r}); score them against their own annotations")
    if not predictions:
        raise MetricInputError("no predictions to score; give at least one")
    java = java_available()
    if tokenizer == "auto":
        tokenizer = "ptb" if java else "simple"
    if tokenizer == "ptb" and not java:
        raise MetricInputError("the PTB tokenizer needs Java, which is not installed; install a Java runtime or use the simple tokenizer")
    ids = list(predictions)
    if tokenizer == "ptb":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        ptb = PTBTokenizer()
        res = ptb.tokenize({k: [{"caption": predictions[k]}] for k in ids})
        gts = ptb.tokenize({k: [{"caption": c} for c in references[k]] for k in ids})
    else:
        res = {k: [simple_tokenize(predictions[k])] for k in ids}
        gts = {k: [simple_tokenize(c) for c in references[k]] for k in ids}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
    scores["METEOR"] = None
    if java and meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scores["METEOR"] = float(Meteor().compute_score(gts, res)[0])
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return {**scores, "tokenizer": tokenizer, "images": len(ids)}


# ---- retrieval, grounding, images ----------------------------------------------------------------------


def _first_relevant_rank(similarity: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """For each row, the rank (0 = best) of its most similar relevant column; the column count when none is."""
    order = similarity.argsort(dim=1, descending=True, stable=True)
    hits = relevant.gather(1, order)
    return torch.where(hits.any(1), hits.float().argmax(1), torch.tensor(similarity.shape[1]))


def retrieval_recall(similarity: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K both ways from an (images, texts) similarity matrix and a same-shaped boolean matrix of
    which texts describe which images: a query counts when any relevant item is among its K best."""
    image_rank = _first_relevant_rank(similarity, relevant)
    text_rank = _first_relevant_rank(similarity.T, relevant.T)
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = float((image_rank < k).float().mean())
        out[f"text_to_image_R@{k}"] = float((text_rank < k).float().mean())
    return out


def owners_to_relevant(text_image: Sequence[int], images: int) -> torch.Tensor:
    """The relevance matrix of a caption set where text j describes image text_image[j] alone."""
    relevant = torch.zeros(images, len(text_image), dtype=torch.bool)
    relevant[torch.as_tensor(text_image), torch.arange(len(text_image))] = True
    return relevant


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_accuracy(predicted: Sequence[Sequence[float] | None], truth: Sequence[Sequence[float]], threshold: float = 0.5) -> float:
    """The share of expressions whose predicted box overlaps the true one at IoU >= threshold (RefCOCO's
    Acc@0.5); a missing prediction (None) counts as wrong."""
    hits = [p is not None and box_iou(p, t) >= threshold for p, t in zip(predicted, truth, strict=True)]
    return sum(hits) / len(hits)


def box_misses(predicted: Sequence[float], truth: Sequence[float]) -> tuple[float, float]:
    """How far a box is off, in pixels: its centre's miss (|dx| + |dy|) and its sides' (|dw| + |dh|).
    Where Acc@0.5 is 0, these still show a model learning where, and how big, objects are."""
    (a0, b0, a1, b1), (c0, d0, c1, d1) = predicted, truth
    centre = abs((a0 + a1 - c0 - c1) / 2) + abs((b0 + b1 - d0 - d1) / 2)
    return centre, abs((a1 - a0) - (c1 - c0)) + abs((b1 - b0) - (d1 - d0))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID's distance between Gaussians fitted to two (n, d) feature sets:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2), the trace of the root from the eigenvalues of
    S_a S_b (real and non-negative for covariances, up to rounding), which needs no scipy."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        raise MetricInputError("the Frechet distance needs at least two feature vectors on each side; give more images")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_trace = np.sqrt(np.clip(np.linalg.eigvals(cov_a @ cov_b).real, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * root_trace)


def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> float:
    """The CLIP score of matched (image, text) feature pairs: the mean of 100 x max(cosine, 0)."""
    cos = torch.nn.functional.cosine_similarity(image_features.float(), text_features.float(), dim=-1)
    return float((100 * cos.clamp(min=0)).mean())
