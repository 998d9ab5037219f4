"""The metrics against hand-computed cases and, for captions, against pycocoevalcap's own COCOEvalCap run
on COCO-format files."""

import json

import numpy as np
import pytest
import torch

from nextmm.eval.metrics import (
    box_iou, box_misses, caption_scores, clip_score, frechet_distance, grounding_accuracy, java_available, normalize_answer,
    owners_to_relevant, retrieval_recall, simple_tokenize, vqa_accuracy, vqa_scores,
)

needs_java = pytest.mark.skipif(not java_available(), reason="pycocoevalcap's PTB tokenizer and METEOR run on Java")


@pytest.mark.parametrize("raw, normalized", [
    ("Two dogs.", "2 dogs"), ("the cat", "cat"), ("dont", "don't"), ("1,000", "1000"), ("yes!", "yes"),
    ("  A\tred-ish ball\n", "red ish ball"), ("none", "0"), ("3.5", "3.5"), ("black and white", "black and white"),
])
def test_answer_normalization(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_vqa_accuracy_is_min_1_of_matches_over_3_averaged_over_leave_one_out_subsets():
    humans = ["2"] * 3 + ["3"] * 7
    # leaving out one of the three "2"s leaves 2 matches (2/3), leaving out a "3" leaves 3 (1): (3 x 2/3 + 7) / 10
    assert vqa_accuracy("two", humans) == pytest.approx(0.9)
    assert vqa_accuracy("3", humans) == 1.0
    assert vqa_accuracy("4", humans) == 0.0
    assert vqa_accuracy("yes", ["yes"] + ["no"] * 9) == pytest.approx(0.3)  # 9 subsets with 1 match: 1/3 each
    # disagreeing human answers lose their punctuation; agreeing ones are compared as written
    assert vqa_accuracy("dark red", ["dark-red"] * 5 + ["blue"] * 5) == 1.0
    assert vqa_accuracy("dark red", ["dark-red"] * 10) == 0.0


# Each expected value by hand from the official VQAv2 evaluation (vqaEval.py): the prediction goes through
# processPunctuation then processDigitArticle; the human answers, only when they disagree, through
# processPunctuation alone; each of the 10 leave-one-out subsets scores min(1, matches / 3); the mean.
@pytest.mark.parametrize("prediction, humans, expected", [
    # "two" -> "2" on the prediction's side only: 2 humans match; leaving out one of them (2 subsets) leaves
    # 1 match (1/3), any other (8 subsets) leaves 2 (2/3): (2/3 + 16/3) / 10 = 0.6
    ("2", ["two"] * 4 + ["2"] * 2 + ["3"] * 4, 0.6),
    # articles likewise: "a cat" stays as typed, so only the 2 bare "cat"s match: 0.6 as above
    ("the cat", ["a cat"] * 8 + ["cat"] * 2, 0.6),
    # contractions likewise: "dont" -> "don't" for the prediction, while "dont" typed by 8 humans stays
    ("dont", ["dont"] * 8 + ["don't"] * 2, 0.6),
    # the period pattern "(?!<=\d)(\.)(?!\d)" misspells its lookbehind as a lookahead, so only "not before a
    # digit" holds it back: "2." loses its period and matches all 10 agreeing "2"s
    ("2.", ["2"] * 10, 1.0),
    # on disagreeing human answers too: the 3 "2."s become "2"; leaving out one of them (3 subsets) leaves 2
    # matches (2/3), any other (7 subsets) 3 (1): (2 + 7) / 10 = 0.9
    ("2", ["2."] * 3 + ["3"] * 7, 0.9),
    # a period before a digit stays: "2.5" is not "25"
    ("2.5", ["25"] * 10, 0.0),
])
def test_vqa_accuracy_follows_the_official_evaluation(prediction, humans, expected):
    assert vqa_accuracy(prediction, humans) == pytest.approx(expected)


def test_vqa_scores_per_question_and_answer_type():
    questions = {
        1: {"answers": ["yes"] * 10, "question_type": "is the", "answer_type": "yes/no"},
        2: {"answers": ["2"] * 10, "question_type": "how many", "answer_type": "number"},
        3: {"answers": ["no"] * 10, "question_type": "is the", "answer_type": "yes/no"},
    }
    scores = vqa_scores({1: "Yes", 2: "two", 3: "yes"}, questions)
    assert scores["overall"] == pytest.approx(66.67)
    assert scores["per_question_type"] == {"how many": 100.0, "is the": 50.0}
    assert scores["per_answer_type"] == {"number": 100.0, "yes/no": 50.0}
    assert scores["questions"] == 3


def test_caption_metrics_by_hand():
    refs = {1: ["a large red circle"]}
    scores = caption_scores({1: "a red circle"}, refs, tokenizer="simple", meteor=False)
    # ROUGE-L: LCS 3 words, precision 3/3, recall 3/4, F with beta = 1.2
    p, r, beta2 = 1.0, 0.75, 1.2**2
    assert scores["ROUGE-L"] == pytest.approx((1 + beta2) * p * r / (r + beta2 * p), abs=1e-6)
    same = caption_scores({1: "a large red circle", 2: "two blue squares"}, {1: ["a large red circle"], 2: ["two blue squares"]}, tokenizer="simple", meteor=False)
    assert same["METEOR"] is None
    assert same["BLEU-1"] == pytest.approx(1.0, abs=1e-6) and same["ROUGE-L"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no reference"):
        caption_scores({1: "x", 9: "y"}, refs, meteor=False)
    with pytest.raises(ValueError, match="no predictions"):
        caption_scores({}, refs, meteor=False)


CAPTIONS = [
    "A man riding a wave on top of a surfboard.", "Two dogs playing in the snow, aren't they?",
    "The cat's toy is on the sofa.", "a large red circle above a small blue square",
    "A plate of food with broccoli and rice -- delicious!", "People don't walk on the (empty) street; it's late.",
    "the [big] cat", 'a "quoted" word', "he said: yes; no", "it costs $5 & 10% off", "one/two dogs",
    "U.S. flag at 3.5 pm...", "a dog's bone, cats' toys", "e-mail me @home #tag",
]


@needs_java
def test_simple_tokenizer_matches_ptb_on_ordinary_captions():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ptb = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(CAPTIONS)})
    assert [simple_tokenize(c) for c in CAPTIONS] == [ptb[i][0] for i in range(len(CAPTIONS))]


@needs_java
def test_caption_scores_equal_cocoevalcap_on_coco_files(tmp_path, monkeypatch):
    import pycocoevalcap.eval
    from pycocoevalcap.eval import COCOEvalCap
    from pycocotools.coco import COCO

    refs = {
        1: ["A man riding a wave on a surfboard.", "A surfer rides a big wave.", "Someone surfing in the ocean."],
        2: ["Two dogs play in the snow.", "A pair of dogs running through snow."],
        3: ["A cat sleeping on a couch.", "The cat is on the sofa."],
    }
    preds = {1: "a man riding a wave on a surfboard", 2: "two dogs in the snow", 3: "a dog on a sofa"}
    annotations = {
        "images": [{"id": i} for i in refs], "type": "captions", "info": {}, "licenses": [],
        "annotations": [{"image_id": i, "id": 10 * i + k, "caption": c} for i, cs in refs.items() for k, c in enumerate(cs)],
    }
    (tmp_path / "ann.json").write_text(json.dumps(annotations))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": i, "caption": c} for i, c in preds.items()]))
    # SPICE downloads Stanford models on first use, which cannot happen here; it is not among our metrics
    monkeypatch.setattr(pycocoevalcap.eval, "Spice", lambda: type("NoSpice", (), {"compute_score": lambda self, g, r: (0.0, [0.0] * len(g)), "method": lambda self: "SPICE"})())
    coco = COCO(str(tmp_path / "ann.json"))
    reference = COCOEvalCap(coco, coco.loadRes(str(tmp_path / "res.json")))
    reference.evaluate()
    ours = caption_scores(preds, refs, tokenizer="ptb")
    for ours_key, their_key in (("BLEU-4", "Bleu_4"), ("BLEU-1", "Bleu_1"), ("METEOR", "METEOR"), ("ROUGE-L", "ROUGE_L"), ("CIDEr", "CIDEr")):
        assert ours[ours_key] == pytest.approx(reference.eval[their_key], abs=1e-9), ours_key


def test_retrieval_recall_both_ways():
    # 3 images, 4 texts; text j describes image owner[j]
    owner = [0, 0, 1, 2]
    sim = torch.tensor([
        [0.9, 0.1, 0.8, 0.0],   # image 0: best text 0 (its own) -> rank 0
        [0.2, 0.3, 0.1, 0.5],   # image 1: its text 2 ranks last (3rd of 4 -> rank 3)
        [0.1, 0.95, 0.2, 0.4],  # image 2: its text 3 ranks 1st behind text 1 -> rank 1
    ])
    r = retrieval_recall(sim, owners_to_relevant(owner, 3), ks=(1, 2, 5))
    assert r["image_to_text_R@1"] == pytest.approx(1 / 3)
    assert r["image_to_text_R@2"] == pytest.approx(2 / 3)
    assert r["image_to_text_R@5"] == 1.0
    # the rank of each text's own image: text 0 -> 0; text 1 -> 2 (0.1 is its column's lowest);
    # text 2 -> 2 (0.1 again); text 3 -> 1 (image 1's 0.5 beats its 0.4)
    assert r["text_to_image_R@1"] == pytest.approx(1 / 4)
    assert r["text_to_image_R@2"] == pytest.approx(2 / 4)
    assert r["text_to_image_R@5"] == 1.0
    # several relevant images per text (captions shared by scenes): any of them in the top K counts
    relevant = owners_to_relevant(owner, 3)
    relevant[2, 1] = True
    assert retrieval_recall(sim, relevant, ks=(1,))["text_to_image_R@1"] == pytest.approx(2 / 4)


def test_iou_and_grounding_accuracy():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    truth = [(0, 0, 10, 10)] * 3
    assert grounding_accuracy([(0, 0, 10, 10), (5, 0, 15, 10), None], truth) == pytest.approx(1 / 3)
    assert grounding_accuracy([(0, 0, 10, 8)], truth[:1]) == 1.0  # IoU 0.8
    assert box_misses((5, 0, 15, 10), truth[0]) == (5.0, 0.0)  # moved right by 5: the centre misses, the sides do not
    assert box_misses((0, 0, 20, 14), truth[0]) == (7.0, 14.0)  # grown from the corner: centre (5, 2) off, sides 10 + 4


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    b = rng.normal(size=(4000, 3)) * 2.0 + 1.0
    # Gaussians N(0, I) and N(1, 4I) in 3-d: 3 x 1^2 + 3 x (1 + 4 - 2 x 2) = 6, up to sampling
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.05)
    with pytest.raises(ValueError, match="two feature vectors"):
        frechet_distance(a[:1], b)


def test_clip_score():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    txt = torch.tensor([[2.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    assert clip_score(img, txt) == pytest.approx((100 + 100 / 2**0.5 + 0) / 3)


def test_detection_f1_matches_phrase_and_box_once():
    from nextmm.worlds.shapes.evaluation import detection_f1

    truth = [[{"size": "large", "colour": "red", "shape": "circle", "box": [0, 0, 20, 20]},
              {"size": "small", "colour": "blue", "shape": "square", "box": [30, 30, 42, 42]}]]
    listed = [[("a large red circle", (0, 0, 20, 18)),   # right (IoU 0.9)
               ("a large red circle", (0, 0, 20, 20)),   # a second claim on a matched object: wrong
               ("a small blue square", (0, 0, 12, 12))]]  # right phrase, wrong place
    # 1 hit, 3 listed, 2 true: F1 = 2 x 1 / (3 + 2)
    assert detection_f1(listed, truth) == pytest.approx(2 / 5)
    assert detection_f1([[]], [[]]) == 0.0
