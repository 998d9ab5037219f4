"""`nextmm eval captions` and `nextmm eval vqa` on small files in the benchmarks' own formats, written
here: scores, the predictions log, scoring a results file, and every bad input one clear sentence."""

import json

import numpy as np
import pytest

from nextmm.eval.files import predictions_path
from nextmm.eval.language import eval_captions
from nextmm.worlds.shapes import generator as shapes
from test_cli import assert_one_clear_line, model_dir, run  # noqa: F401  (fixture)

SCENES = [shapes.sample_scene(np.random.default_rng([5, i])) for i in range(5)]


@pytest.fixture()
def coco(tmp_path):
    images = tmp_path / "val2014"
    images.mkdir()
    entries, anns = [], []
    for i, scene in enumerate(SCENES):
        name = f"COCO_val2014_{100 + i:012d}.jpg"
        scene.image().save(images / name)
        entries.append({"id": 100 + i, "file_name": name})
        anns += [{"id": 10 * i + k, "image_id": 100 + i, "caption": c} for k, c in enumerate([scene.caption(), f"a picture. {scene.caption()}"])]
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"images": entries, "annotations": anns}))
    return path, images


@pytest.fixture()
def vqa(coco, tmp_path):
    _, images = coco
    questions, annotations = [], []
    for i in range(len(SCENES)):
        for k, (q, a) in enumerate((("is there a circle?", "yes"), ("how many objects are there?", "2"))):
            qid = 1000 * i + k
            questions.append({"question_id": qid, "image_id": 100 + i, "question": q})
            annotations.append({"question_id": qid, "image_id": 100 + i, "question_type": q.split()[0], "answer_type": "other",
                                "multiple_choice_answer": a, "answers": [{"answer": a, "answer_id": j} for j in range(10)]})
    qpath, apath = tmp_path / "questions.json", tmp_path / "annotations.json"
    qpath.write_text(json.dumps({"questions": questions}))
    apath.write_text(json.dumps({"annotations": annotations}))
    return qpath, apath, images


def test_captions_scores_logs_predictions_and_rescores_them(capsys, model_dir, coco, tmp_path):  # noqa: F811
    ann, images = coco
    out = tmp_path / "res" / "captions.json"
    code, printed, _ = run(capsys, "eval", "captions", "--model", model_dir, "--annotations", str(ann), "--images", str(images),
                           "--out", str(out), "--tokenizer", "simple", "--no-meteor")
    assert code == 0
    scores = json.loads(printed)
    assert json.loads(out.read_text()) == scores
    assert scores["images"] == 5 and scores["tokenizer"] == "simple" and scores["METEOR"] is None
    assert 0 <= scores["BLEU-4"] <= 1 and scores["CIDEr"] >= 0
    logged = [json.loads(line) for line in predictions_path(out).read_text().splitlines()]
    assert sorted(r["image_id"] for r in logged) == [100, 101, 102, 103, 104]
    code, printed, _ = run(capsys, "eval", "captions", "--annotations", str(ann), "--images", str(images),
                           "--predictions", str(predictions_path(out)), "--tokenizer", "simple", "--no-meteor")
    assert code == 0 and json.loads(printed) == scores


def test_perfect_captions_score_bleu_1(capsys, coco, tmp_path):
    ann, images = coco
    perfect = tmp_path / "perfect.json"  # the COCO results format: a JSON list
    perfect.write_text(json.dumps([{"image_id": 100 + i, "caption": s.caption()} for i, s in enumerate(SCENES)]))
    code, printed, _ = run(capsys, "eval", "captions", "--annotations", str(ann), "--images", str(images),
                           "--predictions", str(perfect), "--tokenizer", "simple", "--no-meteor")
    assert code == 0 and json.loads(printed)["BLEU-4"] == pytest.approx(1.0, abs=1e-6)


# image id -> (its reference captions, a predicted caption); plain lower-case words, which every tokenizer
# leaves as they are, so pycocoevalcap's scorers can read them directly. Each prediction is nearer its
# image's later references than its first.
SEVERAL_REFERENCES = {
    100: (["a red circle", "a large red circle on the left", "one red circle beside a blue square"], "a large red circle beside a blue square"),
    101: (["two shapes", "a small green triangle above a yellow square", "a green triangle and a yellow square"], "a green triangle above a yellow square"),
    102: (["a blue square", "a big blue square in the middle", "one blue square in the centre"], "a big blue square in the centre"),
}


def cocoevalcap_scores(references: dict, predictions: dict) -> dict:
    """BLEU-1..4, ROUGE-L and CIDEr from pycocoevalcap's scorers, called here without nextmm."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    res = {k: [c] for k, c in predictions.items()}
    bleu, _ = Bleu(4).compute_score(references, res, verbose=0)
    return {**{f"BLEU-{n + 1}": b for n, b in enumerate(bleu)},
            "ROUGE-L": Rouge().compute_score(references, res)[0], "CIDEr": Cider().compute_score(references, res)[0]}


def test_captions_are_scored_against_every_reference_caption(capsys, tmp_path):
    images = tmp_path / "val2014"
    images.mkdir()
    entries, anns = [], []
    for i, (image_id, (refs, _)) in enumerate(SEVERAL_REFERENCES.items()):
        SCENES[i].image().save(images / f"{image_id}.jpg")
        entries.append({"id": image_id, "file_name": f"{image_id}.jpg"})
        anns += [{"id": 10 * image_id + k, "image_id": image_id, "caption": c} for k, c in enumerate(refs)]
    ann = tmp_path / "captions.json"
    ann.write_text(json.dumps({"images": entries, "annotations": anns}))
    predicted = {image_id: caption for image_id, (_, caption) in SEVERAL_REFERENCES.items()}
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": k, "caption": c} for k, c in predicted.items()]))
    code, printed, _ = run(capsys, "eval", "captions", "--annotations", str(ann), "--images", str(images),
                           "--predictions", str(results), "--tokenizer", "simple", "--no-meteor")
    assert code == 0
    scores = json.loads(printed)
    expected = cocoevalcap_scores({k: refs for k, (refs, _) in SEVERAL_REFERENCES.items()}, predicted)
    first_only = cocoevalcap_scores({k: refs[:1] for k, (refs, _) in SEVERAL_REFERENCES.items()}, predicted)
    assert all(first_only[name] != pytest.approx(value) for name, value in expected.items())  # the test can tell them apart
    assert {name: scores[name] for name in expected} == pytest.approx(expected, abs=1e-9)


def test_vqa_scores_every_human_answer_rather_than_the_multiple_choice_answer(capsys, vqa, tmp_path):
    questions, annotations, images = vqa
    humans = {0: ["two"] * 4 + ["2"] * 2 + ["3"] * 4, 1: ["yes"] * 7 + ["no"] * 3}  # question 0 is an "is", 1 a "how"

    def answered_so(data):
        for ann in data["annotations"]:
            if ann["question_id"] in humans:
                said = humans[ann["question_id"]]
                ann["answers"] = [{"answer": a, "answer_id": j + 1} for j, a in enumerate(said)]
                ann["multiple_choice_answer"] = said[0]

    _rewrite(annotations, answered_so)
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps([{"question_id": 0, "answer": "2"}, {"question_id": 1, "answer": "no"}]))
    code, printed, _ = run(capsys, "eval", "vqa", "--questions", str(questions), "--annotations", str(annotations),
                           "--images", str(images), "--predictions", str(answers))
    # by hand, as the official evaluation scores them: "2" matches the 2 humans who typed "2" ("two" stays as
    # typed on their side): (2 x 1/3 + 8 x 2/3) / 10 = 0.6; "no" matches 3 humans: (3 x 2/3 + 7 x 1) / 10 = 0.9.
    # Against the multiple-choice answers ("two", "yes") both would score 0.
    scores = json.loads(printed)
    assert code == 0 and scores["overall"] == 75.0 and scores["per_question_type"] == {"how": 90.0, "is": 60.0}


def test_an_eval_stopped_half_way_keeps_its_predictions(micro_nextmm, coco, tmp_path, monkeypatch):
    ann, images = coco
    micro_nextmm.batch_size = 2
    calls = []

    def failing_caption(pictures, **kwargs):
        calls.append(len(pictures))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return ["a caption"] * len(pictures)

    monkeypatch.setattr(micro_nextmm, "caption", failing_caption)
    out = tmp_path / "captions.json"
    with pytest.raises(KeyboardInterrupt):
        eval_captions(micro_nextmm, ann, images, out=out, meteor=False)
    assert [json.loads(line)["image_id"] for line in predictions_path(out).read_text().splitlines()] == [100, 101]


def test_vqa_official_accuracy_closed_set_and_results_file(capsys, model_dir, vqa, tmp_path):  # noqa: F811
    questions, annotations, images = vqa
    out = tmp_path / "vqa.json"
    code, printed, _ = run(capsys, "eval", "vqa", "--model", model_dir, "--questions", str(questions), "--annotations", str(annotations),
                           "--images", str(images), "--answers", "yes,no,2", "--out", str(out))
    assert code == 0
    scores = json.loads(printed)
    assert scores["questions"] == 10 and set(scores["per_question_type"]) == {"is", "how"}
    logged = [json.loads(line) for line in predictions_path(out).read_text().splitlines()]
    assert {r["answer"] for r in logged} <= {"yes", "no", "2"}
    # a results file: "Yes." right for the circle questions, "two" (normalized to the humans' "2") for the counts
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps([{"question_id": r["question_id"], "answer": "Yes." if r["question_id"] % 1000 == 0 else "two"} for r in logged]))
    code, printed, _ = run(capsys, "eval", "vqa", "--questions", str(questions), "--annotations", str(annotations),
                           "--images", str(images), "--predictions", str(answers))
    assert code == 0 and json.loads(printed)["overall"] == 100.0


def _rewrite(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_bad_caption_inputs_are_one_clear_sentence(capsys, model_dir, coco, tmp_path):  # noqa: F811
    ann, images = coco
    base = ["eval", "captions", "--annotations", str(ann), "--images", str(images), "--tokenizer", "simple", "--no-meteor"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_one_clear_line(*run(capsys, *base, "--predictions", str(empty))[::2], "empty.jsonl", "no predictions")
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps([{"image_id": 999, "caption": "x"}]))
    assert_one_clear_line(*run(capsys, *base, "--predictions", str(unknown))[::2], "999")
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps([{"image_id": 100, "caption": "x"}, {"image_id": 100, "caption": "y"}]))
    assert_one_clear_line(*run(capsys, *base, "--predictions", str(twice))[::2], "two predictions", "100")
    assert_one_clear_line(*run(capsys, *base)[::2], "--model", "--predictions")
    (images / "COCO_val2014_000000000102.jpg").unlink()
    assert_one_clear_line(*run(capsys, *base, "--model", model_dir)[::2], "1 of the 5 images", "COCO_val2014_000000000102.jpg")
    _rewrite(ann, lambda d: d["images"].append(dict(d["images"][0])))
    assert_one_clear_line(*run(capsys, *base, "--model", model_dir)[::2], "image id 100 twice")
    _rewrite(ann, lambda d: (d["images"].pop(), d["annotations"].append({"id": 7, "image_id": 555, "caption": "x"})))
    assert_one_clear_line(*run(capsys, *base, "--model", model_dir)[::2], "image_id that 'images' does not list")


def test_bad_vqa_inputs_are_one_clear_sentence(capsys, model_dir, vqa):  # noqa: F811
    questions, annotations, images = vqa
    base = ["eval", "vqa", "--model", model_dir, "--questions", str(questions), "--annotations", str(annotations), "--images", str(images)]
    _rewrite(annotations, lambda d: d["annotations"].pop())
    assert_one_clear_line(*run(capsys, *base)[::2], "1 questions", "no annotation")
    _rewrite(questions, lambda d: d["questions"].pop())
    _rewrite(questions, lambda d: d["questions"].append(dict(d["questions"][0])))
    assert_one_clear_line(*run(capsys, *base)[::2], "two questions with question_id 0")


@pytest.fixture()
def clip_model_dir(tmp_path, micro_model, tokenizer, micro_config):
    import torch

    from nextmm.api import NextMM
    from nextmm.models.clip import CLIP

    torch.manual_seed(1)
    clip = CLIP(micro_config.vision, micro_config.clip_text, tokenizer.vocab_size)
    return str(NextMM(micro_model, tokenizer, micro_config, clip=clip).save(tmp_path / "clip_model"))


def test_retrieval_with_the_clip_stage(capsys, clip_model_dir, coco):
    import nextmm

    ann, images = coco
    code, printed, _ = run(capsys, "eval", "retrieval", "--model", clip_model_dir, "--annotations", str(ann), "--images", str(images))
    assert code == 0
    scores = json.loads(printed)
    assert scores["images"] == 5 and scores["texts"] == 10
    # Recall@K by hand from the API's features: image i's captions are texts 2i and 2i + 1; a query counts
    # when one of its own is among the K most similar
    m = nextmm.load(clip_model_dir)
    pics = [str(images / f"COCO_val2014_{100 + i:012d}.jpg") for i in range(5)]
    texts = [c for s in SCENES for c in (s.caption(), f"a picture. {s.caption()}")]
    similarity = (m.clip_image_features(pics) @ m.clip_text_features(texts).T).numpy()
    image_rank = [min(list(np.argsort(-similarity[i])).index(j) for j in (2 * i, 2 * i + 1)) for i in range(5)]
    text_rank = [list(np.argsort(-similarity[:, j])).index(j // 2) for j in range(10)]
    expected = {}
    for k in (1, 5, 10):
        expected[f"image_to_text_R@{k}"] = np.mean([r < k for r in image_rank])
        expected[f"text_to_image_R@{k}"] = np.mean([r < k for r in text_rank])
    assert {name: scores[name] for name in expected} == pytest.approx(expected)


def test_zero_shot_classification_both_ways(capsys, clip_model_dir, tmp_path):
    import nextmm

    root = tmp_path / "classes"
    for shape in ("circle", "square", "triangle"):
        (root / f"a_{shape}").mkdir(parents=True)
        for i, scene in enumerate(s for s in SCENES[:3]):
            scene.image().save(root / f"a_{shape}" / f"{i}.png")
    m = nextmm.load(clip_model_dir)
    labels = ["a circle", "a square", "a triangle"]
    expected = m.classify([s.image() for s in SCENES[:3]], labels)
    code, printed, _ = run(capsys, "eval", "classify", "--model", clip_model_dir, "--images", str(root))
    scores = json.loads(printed)
    assert code == 0 and scores["images"] == 9 and scores["classes"] == 3
    # every class folder holds the same three pictures, so each is right exactly in its predicted class's folder
    assert scores["accuracy"] == pytest.approx(1 / 3)
    assert scores["per_class"] == {name: expected.count(name) / 3 for name in labels}
    code, printed, _ = run(capsys, "eval", "classify", "--model", clip_model_dir, "--images", str(root), "--method", "caption")
    assert code == 0 and json.loads(printed)["accuracy"] == pytest.approx(1 / 3)


def test_bad_retrieval_and_classification_inputs(capsys, model_dir, clip_model_dir, coco, tmp_path):  # noqa: F811
    ann, images = coco
    assert_one_clear_line(*run(capsys, "eval", "retrieval", "--model", model_dir, "--annotations", str(ann), "--images", str(images))[::2], "no CLIP stage")
    (tmp_path / "one" / "cat").mkdir(parents=True)
    SCENES[0].image().save(tmp_path / "one" / "cat" / "0.png")
    assert_one_clear_line(*run(capsys, "eval", "classify", "--model", clip_model_dir, "--images", str(tmp_path / "one"))[::2], "at least two sub-folders")
    assert_one_clear_line(*run(capsys, "eval", "classify", "--model", clip_model_dir, "--images", str(tmp_path / "one"), "--template", "x")[::2])


def test_eval_shapes_writes_json_and_a_markdown_table(capsys, clip_model_dir, tmp_path):
    out = tmp_path / "shapes" / "results.json"
    code, printed, _ = run(capsys, "eval", "shapes", "--model", clip_model_dir, "--scenes", "6", "--videos", "2", "--binding", "2", "--out", str(out))
    assert code == 0
    results = json.loads(printed)
    assert 0 <= results["caption_cider"] and 0 <= results["caption_bleu4"] <= 1
    assert 0 <= results["retrieval_text_to_image_R_at_1"] <= 1 and results["retrieval_texts"] <= 6
    table = out.with_suffix(".md").read_text()
    assert f"| captions: CIDEr | {results['caption_cider']:.4g} |" in table
    assert "retrieval (CLIP stage): text -> image R@1" in table


@pytest.fixture()
def refs(coco, tmp_path):
    _, images = coco
    records = [{"id": f"r{i}", "image": f"COCO_val2014_{100 + i:012d}.jpg", "expression": o.phrase, "box": list(o.box)}
               for i, scene in enumerate(SCENES) for o in scene.objects[:1]]
    path = tmp_path / "refs.json"
    path.write_text(json.dumps(records))
    return path, images, records


def test_grounding_eval(capsys, model_dir, micro_nextmm, refs, tmp_path, monkeypatch):  # noqa: F811
    from nextmm.eval.visual import eval_grounding, grounding_records

    path, images, records = refs
    out = tmp_path / "ground.json"
    code, printed, _ = run(capsys, "eval", "grounding", "--model", model_dir, "--refs", str(path), "--images", str(images), "--out", str(out))
    assert code == 0
    scores = json.loads(printed)
    assert scores["expressions"] == 5 and 0 <= scores["acc_at_0.5"] <= 1
    assert len(predictions_path(out).read_text().splitlines()) == 5
    # a model that finds each box shifted by a quarter of its width: IoU (3/4) / (5/4) = 0.6, right at >= 0.5
    shifted = {r["expression"]: (r["box"][0] + (r["box"][2] - r["box"][0]) / 4, r["box"][1], r["box"][2] + (r["box"][2] - r["box"][0]) / 4, r["box"][3]) for r in records}
    monkeypatch.setattr(micro_nextmm, "ground", lambda imgs, phrases: [shifted[p] for p in phrases])
    result = eval_grounding(micro_nextmm, grounding_records(path, images))
    assert result["acc_at_0.5"] == 1.0 and result["mean_iou"] == pytest.approx(0.6)
    coco_style = tmp_path / "bbox.json"
    coco_style.write_text(json.dumps([{"image": r["image"], "expression": r["expression"], "bbox": [r["box"][0], r["box"][1], r["box"][2] - r["box"][0], r["box"][3] - r["box"][1]]} for r in records]))
    assert eval_grounding(micro_nextmm, grounding_records(coco_style, images)) == result


def test_bad_grounding_inputs(capsys, model_dir, refs, tmp_path):  # noqa: F811
    path, images, records = refs
    base = ["eval", "grounding", "--model", model_dir, "--refs", str(path), "--images", str(images)]
    path.write_text(json.dumps(records[:1] + [dict(records[1], box=[10, 10, 80, 30])]))
    assert_one_clear_line(*run(capsys, *base)[::2], "expression #1", "outside its 64x64 image")
    path.write_text(json.dumps(records[:2] + [dict(records[2], id="r0")]))
    assert_one_clear_line(*run(capsys, *base)[::2], "two expressions with id r0")
    path.write_text(json.dumps([dict(records[0], image="nope.jpg")]))
    assert_one_clear_line(*run(capsys, *base)[::2], "nope.jpg")
    path.write_text("[]")
    assert_one_clear_line(*run(capsys, *base)[::2], "no expressions")


def test_video_qa_eval(capsys, model_dir, tmp_path):  # noqa: F811

    root = tmp_path / "videos"
    for k, sample in enumerate(shapes.make_samples("video_caption", 4, 3)):
        folder = root / f"clip{k}"
        folder.mkdir(parents=True)
        for i, frame in enumerate(sample.segments[0].frames):
            frame.save(folder / f"{i:03d}.png")
        (folder / "qa.json").write_text(json.dumps([{"question": "which direction does it move?", "answer": sample.meta["direction"]}]))
    out = tmp_path / "vqa.json"
    code, printed, _ = run(capsys, "eval", "videoqa", "--model", model_dir, "--root", str(root), "--answers", "left,right,up,down", "--out", str(out))
    assert code == 0
    scores = json.loads(printed)
    logged = [json.loads(line) for line in predictions_path(out).read_text().splitlines()]
    assert scores["questions"] == 3 and scores["videos"] == 3 and {r["answer"] for r in logged} <= {"left", "right", "up", "down"}
    truth = {f"clip{k}": s.meta["direction"] for k, s in enumerate(shapes.make_samples("video_caption", 4, 3))}
    assert scores["accuracy"] == pytest.approx(np.mean([r["answer"] == truth[r["video"]] for r in logged]))
    # MSRVTT-QA's own file: one list, video ids naming frame folders (here "clip0" and "video7" for id 7)
    (root / "clip2").rename(root / "video7")
    qa = tmp_path / "test_qa.json"
    qa.write_text(json.dumps([{"video_id": "clip0", "question": "which direction does it move?", "answer": truth["clip0"], "id": 1},
                              {"video_id": 7, "question": "which direction does it move?", "answer": truth["clip2"], "id": 2}]))
    code, printed, _ = run(capsys, "eval", "videoqa", "--model", model_dir, "--qa", str(qa), "--frames", str(root), "--answers", "left,right,up,down")
    assert code == 0 and json.loads(printed)["questions"] == 2 and json.loads(printed)["videos"] == 2
    qa.write_text(json.dumps([{"video_id": 9, "question": "q?", "answer": "a"}]))
    assert_one_clear_line(*run(capsys, "eval", "videoqa", "--model", model_dir, "--qa", str(qa), "--frames", str(root))[::2], "video9/")
    assert_one_clear_line(*run(capsys, "eval", "videoqa", "--model", model_dir)[::2], "--root")
    (root / "clip1" / "qa.json").write_text('{"question": "x"}')
    assert_one_clear_line(*run(capsys, "eval", "videoqa", "--model", model_dir, "--root", str(root))[::2], "clip1")


def mean_colour(images):
    """A user-given feature extractor for `nextmm eval images --features test_eval_benchmarks:mean_colour`."""
    return np.stack([np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(0) for img in images])


def psd_root(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return vectors @ np.diag(np.sqrt(np.clip(values, 0, None))) @ vectors.T


def fid_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    """FID as Heusel et al. define it: |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2), with tr (S_a S_b)^1/2
    taken as tr (S_a^1/2 S_b S_a^1/2)^1/2, whose roots are of symmetric matrices (numpy's eigh)."""
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = psd_root(cov_a)
    cross = np.trace(psd_root(root_a @ cov_b @ root_a))
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def test_images_eval_fid_clip_score_and_judge(capsys, micro_model, tokenizer, micro_config, tmp_path):
    import nextmm
    from nextmm.api import NextMM
    from nextmm.models.clip import CLIP
    from nextmm.models.decoder import VisualDecoder

    micro_config.decoder.sample_steps = 2
    decoder = VisualDecoder(micro_config.decoder, micro_config.resampler.width, micro_config.resampler.num_queries)
    clip = CLIP(micro_config.vision, micro_config.clip_text, tokenizer.vocab_size)
    model_dir = str(NextMM(micro_model, tokenizer, micro_config, decoder=decoder, clip=clip).save(tmp_path / "drawer"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(s.caption() for s in SCENES[:3]) + "\n")
    reference = tmp_path / "real"
    reference.mkdir()
    for i, scene in enumerate(SCENES):
        scene.image().save(reference / f"{i}.png")
    drawings = tmp_path / "drawn"
    base = ["eval", "images", "--model", model_dir, "--prompts", str(prompts), "--reference", str(reference)]
    code, printed, _ = run(capsys, *base, "--save-images", str(drawings), "--features", "test_eval_benchmarks:mean_colour")
    assert code == 0
    scores = json.loads(printed)
    assert scores["images"] == 3 and scores["references"] == 5 and 0 <= scores["clip_score"] <= 100
    assert 0 <= scores["judge_all_objects_right"] <= 1
    drawn = [str(p) for p in sorted(drawings.glob("*.png"))]
    m = nextmm.load(model_dir)
    from PIL import Image as PILImage

    expected = fid_by_hand(mean_colour([PILImage.open(p).convert("RGB") for p in drawn]), mean_colour([s.image() for s in SCENES]))
    assert scores["fid"] == pytest.approx(expected, rel=1e-6) and len(drawn) == 3 and m.decoder is not None
    code, printed, _ = run(capsys, *base, "--candidates", "2", "--save-images", str(tmp_path / "best"))
    assert code == 0 and json.loads(printed)["candidates"] == 2
    captions = prompts.read_text().split("\n")[:3]
    for k, (single, other) in enumerate(zip(drawn, m.draw(captions, seed=1))):  # the two noises each prompt was drawn from
        best = np.asarray(PILImage.open(tmp_path / "best" / f"{k:05d}.png").convert("RGB"))
        assert any(np.array_equal(best, np.asarray(c)) for c in (PILImage.open(single).convert("RGB"), other))
    assert_one_clear_line(*run(capsys, *base, "--features", "no_such_module:f")[::2], "no_such_module:f")
    prompts.write_text("\n")
    assert_one_clear_line(*run(capsys, *base)[::2], "no prompts")


def test_few_shot_captions_and_vqa_on_benchmark_files(capsys, clip_model_dir, coco, vqa, tmp_path, monkeypatch):
    import nextmm
    from nextmm.api import NextMM

    ann, images = coco
    questions, annotations, _ = vqa
    seen = []
    real_generate = NextMM.generate
    monkeypatch.setattr(NextMM, "generate", lambda self, prompts, *a, **k: seen.extend(prompts) or real_generate(self, prompts, *a, **k))
    base = ["eval", "captions", "--model", clip_model_dir, "--annotations", str(ann), "--images", str(images), "--tokenizer", "simple", "--no-meteor"]
    code, printed, _ = run(capsys, *base, "--shots", "2", "--select", "rices", "--support-annotations", str(ann), "--support-images", str(images))
    assert code == 0 and json.loads(printed)["images"] == 5
    # RICES over a support split holding the query itself: its own picture is the nearest, shown last
    m = nextmm.load(clip_model_dir)
    for prompt in seen:
        assert len(prompt) == 5 and prompt[1].text in [s.caption() for s in SCENES]  # 2 x (image, caption) + query
        assert m.clip_image_features([prompt[2].image]).allclose(m.clip_image_features([prompt[4].image]), atol=1e-5)
    seen.clear()
    code, printed, _ = run(capsys, "eval", "vqa", "--model", clip_model_dir, "--questions", str(questions), "--annotations", str(annotations),
                           "--images", str(images), "--shots", "1", "--support-questions", str(questions), "--support-annotations",
                           str(annotations), "--support-images", str(images), "--answers", "yes,no,2")
    assert code == 0 and json.loads(printed)["questions"] == 10
    assert all(len(p) == 5 and p[4].text.startswith("question:") for p in seen)  # image, question, answer, image, question
    assert_one_clear_line(*run(capsys, *base, "--shots", "2")[::2], "--support-annotations")
