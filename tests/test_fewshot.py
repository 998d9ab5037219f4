"""Few-shot evaluation: RICES picks the most similar support examples, binding episodes are consistent,
and `nextmm eval fewshot` reports every task, selection and shot count."""

import json

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from nextmm.data.sample import Image, Text
from nextmm.eval.fewshot import binding_scores, choose_shots
from nextmm.worlds.shapes import generator as shapes
from test_cli import assert_one_clear_line, run
from test_eval_benchmarks import clip_model_dir  # noqa: F401  (fixture)


def test_rices_picks_the_most_similar_support_examples_most_similar_last():
    pool = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [0.9, 0.1], [-1.0, 0.0]]), dim=1)
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    rng = np.random.default_rng(0)
    assert choose_shots(query, pool, 2, "rices", rng) == [[3, 0], [2, 1]]
    random_pick = choose_shots(query, pool, 3, "random", rng)
    assert all(len(set(row)) == 3 and set(row) <= set(range(5)) for row in random_pick)
    assert choose_shots(query, pool, 0, "rices", rng) == [[], []]
    with pytest.raises(ValueError, match="support pool"):
        choose_shots(query, pool, 6, "random", rng)


def test_binding_episodes_name_each_image_by_its_bound_word():
    from nextmm.worlds.shapes.judge import judge

    for i in range(10):
        pool, (query, answer) = shapes.binding_episode(np.random.default_rng([4, i]), 8)
        assert len(pool) == 8 and answer in {w for _, w in pool}
        # one word per (attribute, value): images with the same word share the bound shape or colour
        seen = {}
        for image, word in pool + [(query, answer)]:
            (obj,) = judge(image)
            seen.setdefault(word, []).append((obj.colour, obj.shape))
        for word, objs in seen.items():
            assert len({c for c, _ in objs}) == 1 or len({s for _, s in objs}) == 1


def test_eval_fewshot_cli(capsys, clip_model_dir, tmp_path):  # noqa: F811
    out = tmp_path / "fewshot.json"
    code, printed, _ = run(capsys, "eval", "fewshot", "--model", clip_model_dir, "--n", "3", "--shots", "0,2", "--out", str(out))
    assert code == 0
    results = json.loads(printed)
    assert set(results) == {"captions", "vqa", "binding"}
    assert set(results["captions"]["rices"]) == {"0", "2"} and set(results["binding"]["random"]) == {"2"}
    assert 0 <= results["vqa"]["random"]["2"]["accuracy"] <= 1
    assert set(results["binding"]["random"]["2"]) == {"accuracy", "choice_accuracy", "chance"}
    assert results["binding"]["random"]["2"]["chance"] > 0
    assert json.loads(out.read_text()) == results
    assert_one_clear_line(*run(capsys, "eval", "fewshot", "--model", clip_model_dir, "--shots", "2,x")[::2], "--shots")
    assert_one_clear_line(*run(capsys, "eval", "fewshot", "--model", clip_model_dir, "--select", "best")[::2], "--select")


class ScriptedModel:
    """Writes `written` when writing freely and `chosen` when choosing among offered answers, which it keeps."""

    def __init__(self, written: list[str], chosen: list[str]):
        self.written, self.chosen, self.offered = written, chosen, None

    def generate(self, prompts, max_new_tokens=32, answers=None):
        if answers is None:
            return self.written
        self.offered = answers
        return self.chosen


def binding_prompt(*words: str) -> list:
    picture = PILImage.new("RGB", (8, 8))
    shots = [segment for word in words for segment in (Image(picture), Text(f"this is a {word}"))]
    return [*shots, Image(picture), Text("this is a", target=False)]


def test_binding_choices_come_from_each_prompts_own_shots_and_chance_counts_a_missing_word():
    prompts = [binding_prompt("dabota", "rozu", "dabota"), binding_prompt("kimi", "lopa", "sefu"), binding_prompt("kimi", "lopa")]
    answers = ["rozu", "kimi", "notshown"]  # the last query's word no shot shows: no choice can be right
    m = ScriptedModel(written=["rozu is", "lopa", "kimi"], chosen=["rozu", "kimi", "kimi"])
    scores = binding_scores(m, prompts, answers)
    assert m.offered == [["dabota", "rozu"], ["kimi", "lopa", "sefu"], ["kimi", "lopa"]]  # each prompt's words, first shown first
    # by hand: the first word written is right for the first prompt only, the choice for the first two;
    # a uniform guess is right 1/2, 1/3 and 0 of the time: (1/2 + 1/3 + 0) / 3 = 5/18
    assert scores == pytest.approx({"accuracy": 1 / 3, "choice_accuracy": 2 / 3, "chance": 5 / 18})
