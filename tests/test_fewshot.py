"""Few-shot evaluation: RICES picks the most similar support examples, binding episodes are consistent,
and `nextmm eval fewshot` reports every task, selection and shot count."""

import json

import numpy as np
import pytest
import torch

from nextmm.data import shapes
from nextmm.eval.fewshot import binding_scores, choose_shots
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
    from nextmm.eval.pixels import judge

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


def test_binding_choices_come_from_each_prompts_own_shots_and_chance_counts_a_missing_word(micro_nextmm):
    prompts, answers = [], []
    for i in range(4):
        segments, answer = shapes.binding_fewshot(np.random.default_rng([3, i]), 3)
        prompts.append(segments)
        answers.append(answer)
    answers[3] = "notshown"  # a query whose word no shot shows: no choice can be right, and chance is 0
    scores = binding_scores(micro_nextmm, prompts, answers)
    sizes = [len(shapes.binding_choices(p)) for p in prompts]
    assert scores["chance"] == pytest.approx(np.mean([1 / k for k in sizes[:3]] + [0]))
    chosen = micro_nextmm.generate(prompts, answers=[shapes.binding_choices(p) for p in prompts])
    assert all(c in shapes.binding_choices(p) for c, p in zip(chosen, prompts))
    assert scores["choice_accuracy"] == np.mean([c == a for c, a in zip(chosen, answers)])
