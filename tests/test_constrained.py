"""Constrained decoding: the prefix tree, generation that only writes allowed answers (and picks the one
the model ranks first), `--answers` in the CLI, and grounding's box constraint."""

import pytest
import torch

from nextmm.constrained import AnswerError, AnswerTrie, BoxConstraint, DetectionGrammar, read_answers
from nextmm.data.sample import Image, Text
from test_cli import assert_one_clear_line, image_file, model_dir, run  # noqa: F401  (fixtures)

ANSWERS = ["red circle", "red square", "blue", "a large green triangle"]


def test_the_trie_allows_exactly_the_continuations_of_some_answer(tokenizer):
    trie = AnswerTrie.from_answers(tokenizer, ANSWERS)
    seqs = [tokenizer.encode(a) + [tokenizer.eos_id] for a in ANSWERS]
    assert sorted(trie.allowed([])) == sorted({s[0] for s in seqs})
    red = tokenizer.encode("red")
    assert sorted(trie.allowed(red)) == sorted({tokenizer.encode("red circle")[len(red)], tokenizer.encode("red square")[len(red)]})
    assert trie.allowed(seqs[2]) == []  # "blue" + EOS is complete
    assert trie.allowed([tokenizer.eos_id]) == []  # off the tree
    assert trie.depth == max(len(s) for s in seqs)
    mask = trie.mask(torch.tensor([seqs[2][:-1], red[:1] + [seqs[2][0]] * (len(seqs[2]) - 2)]), tokenizer.vocab_size)
    assert torch.isfinite(mask[0]).nonzero().flatten().tolist() == [tokenizer.eos_id]


def test_constrained_generation_writes_only_allowed_answers_and_rows_do_not_interfere(micro_nextmm, scenes):
    images = [s.image() for s in scenes[:4]]
    questions = ["what color is the circle?", "how many objects are there?", "is there a square?", "what shape is it?"]
    together = micro_nextmm.ask(images, questions, answers=ANSWERS)
    assert all(a in ANSWERS for a in together)
    alone = [micro_nextmm.ask([img], [q], answers=ANSWERS)[0] for img, q in zip(images, questions)]
    assert together == alone


def test_each_prompt_may_have_its_own_answers_across_batches(micro_nextmm, scenes, monkeypatch):
    prompts = [[Image(s.image()), Text("this is a", target=False)] for s in scenes[:5]]
    lists = [["red", "blue"], ["circle"], ["a large green triangle", "square", "two"], ["red", "blue"], ["small", "large"]]
    alone = [micro_nextmm.generate([p], answers=answers)[0] for p, answers in zip(prompts, lists)]
    assert all(a in answers for a, answers in zip(alone, lists)) and alone[1] == "circle"
    monkeypatch.setattr(micro_nextmm, "batch_size", 2)  # three chunks: each must get its own prompts' lists
    assert micro_nextmm.generate(prompts, answers=lists) == alone
    with pytest.raises(AnswerError, match="5 prompts were given 2 lists"):
        micro_nextmm.generate(prompts, answers=lists[:2])
    with pytest.raises(AnswerError, match="empty"):
        micro_nextmm.generate(prompts[:2], answers=[["red"], []])


def test_the_chosen_answer_starts_with_the_allowed_token_the_model_ranks_highest(micro_nextmm, tokenizer, scenes):
    # answers that differ in their first token: greedy decoding's choice among them is made at that token
    words = ["red", "blue", "green", "circle", "square", "triangle", "large", "small", "two", "what", "there"]
    by_first = {tokenizer.encode(w)[0]: w for w in reversed(words)}
    assert len(by_first) >= 4
    first, answers = list(by_first), list(by_first.values())
    m = micro_nextmm
    for scene in scenes[:4]:
        prompt = [Image(scene.image()), Text("this is", target=False)]
        batch = m.builder.collate([m.builder.encode(prompt, close=False)])
        with torch.no_grad():
            hidden = m.model(batch["input_ids"], m.model.encode_images(batch["pixels"]))
            logits = m.model.llm.lm_head(hidden[0, -1])
        expected = answers[int(logits[first].argmax())]
        assert m.generate([prompt], answers=answers) == [expected]


def test_bad_answer_lists_are_refused(tokenizer, tmp_path):
    with pytest.raises(AnswerError, match="empty"):
        AnswerTrie.from_answers(tokenizer, [])
    with pytest.raises(AnswerError, match="empty"):
        AnswerTrie.from_answers(tokenizer, ["yes", "  "])
    listed = tmp_path / "answers.txt"
    listed.write_text("yes\n\nno\n")
    assert read_answers(str(listed)) == ["yes", "no"]
    assert read_answers("yes, no") == ["yes", "no"]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(AnswerError, match="empty.txt"):
        read_answers(str(tmp_path / "empty.txt"))


def test_cli_answers(capsys, model_dir, image_file, tmp_path):  # noqa: F811
    code, out, _ = run(capsys, "ask", "--model", model_dir, "--image", image_file, "is there a circle?", "--answers", "yes,no")
    assert code == 0 and out.strip() in ("yes", "no")
    listed = tmp_path / "shapes.txt"
    listed.write_text("circle\nsquare\ntriangle\n")
    code, out, _ = run(capsys, "caption", "--model", model_dir, image_file, "--answers", str(listed))
    assert code == 0 and out.strip().split("\t")[1] in ("circle", "square", "triangle")
    assert_one_clear_line(*run(capsys, "ask", "--model", model_dir, "--image", image_file, "q?", "--answers", ",")[::2], "--answers")


def test_the_box_constraint_allows_four_location_tokens_in_order_then_eos(tokenizer):
    box, bins = BoxConstraint(tokenizer), tokenizer.bin_ids
    assert len(bins) == tokenizer.location_bins and box.depth == 5
    assert box.allowed([]) == bins and box.allowed(bins[5:6]) == bins
    assert box.allowed([bins[5], bins[9]]) == bins[6:]  # x1 > x0
    assert box.allowed([bins[5], bins[9], bins[7]]) == bins[10:]  # y1 > y0
    assert box.allowed([bins[-1], bins[0]]) == bins[-1:]  # nothing lies right of the last bin
    assert box.allowed(bins[:4]) == [tokenizer.eos_id] and box.allowed(bins[:4] + [tokenizer.eos_id]) == []


def test_the_detection_grammar_ends_every_phrase_with_its_box_and_a_box_with_a_comma_or_the_end(tokenizer):
    from conftest import shapes_texts

    from nextmm.data.sample import Text
    from nextmm.tokenizer import NextTokenizer
    from nextmm.worlds.shapes import generator as shapes

    listed = [seg.text for s in shapes.make_samples("detect", 0, 50) for seg in s.segments if isinstance(seg, Text)]
    tokenizer = NextTokenizer.train(shapes_texts() + listed, vocab_size=320, location_bins=64)
    grammar, bins, eos = DetectionGrammar(tokenizer, depth=30), tokenizer.bin_ids, tokenizer.eos_id
    comma, phrase = tokenizer.encode(","), tokenizer.encode("a small red circle")
    vocab = tokenizer.vocab_size

    def allowed(prefix: list[int], favourite: int) -> set[int]:
        """What may follow `prefix` when the model likes `favourite` best."""
        logits = torch.randn(1, vocab)
        logits[0, favourite] = 100.0
        return set(grammar.restrict(logits, torch.tensor([prefix])).isfinite().nonzero()[:, 1].tolist())

    words = set(range(vocab)) - set(bins) - set(tokenizer.special_ids)
    assert allowed([], eos) == words | {eos}  # a phrase first (or nothing at all), never a box
    assert allowed(phrase, phrase[0]) == words | set(bins)  # more words, or the box
    assert allowed(phrase, eos) == set(bins)  # where it would end, the phrase gets its box instead
    assert allowed(phrase + bins[5:6], eos) == set(bins) and allowed(phrase + [bins[5], bins[9]], eos) == set(bins[6:])
    assert allowed(phrase + [bins[5], bins[9], bins[7]], eos) == set(bins[10:])
    assert allowed(phrase + bins[:4], phrase[0]) == {comma[0], eos}
    assert len(comma) == 2 and allowed(phrase + bins[:4] + comma[:1], eos) == {comma[1]}  # its space, then itself
    assert allowed(phrase + bins[:4] + comma, eos) == words  # after a comma, the next phrase
    logits = torch.randn(2, vocab)
    kept = grammar.restrict(logits, torch.tensor([phrase, phrase]))
    assert torch.equal(kept[:, bins], logits[:, bins])  # what it allows keeps the model's own scores


def test_detect_gives_a_phrase_its_box_where_the_model_would_end_after_it(micro_nextmm, tokenizer, scenes, monkeypatch):
    from nextmm.generate import Stepper

    said = tokenizer.encode("a red circle")
    real_logits = Stepper.logits

    def scripted(self, hidden):  # the model's own scores, but it likes the phrase's words in turn, then the end
        logits = real_logits(self, hidden)
        likes = said[self.appended] if self.appended < len(said) else tokenizer.eos_id
        return logits.index_fill(1, torch.tensor([likes]), 1e4)

    monkeypatch.setattr(Stepper, "logits", scripted)
    found = micro_nextmm.detect([s.image() for s in scenes[:3]])
    for objects, scene in zip(found, scenes):
        assert [phrase for phrase, _ in objects] == ["a red circle"]  # one object, then the end
        x0, y0, x1, y1 = objects[0][1]
        assert 0 <= x0 < x1 <= scene.image().width and 0 <= y0 < y1 <= scene.image().height


def test_ground_always_writes_a_box_inside_the_picture(micro_nextmm, scenes):
    from PIL import Image as PILImage

    pictures = [s.image() for s in scenes[:3]] + [PILImage.new("RGB", (126, 63), "white")]
    boxes = micro_nextmm.ground(pictures, [s.objects[0].phrase for s in scenes[:4]])
    for (x0, y0, x1, y1), picture in zip(boxes, pictures):  # an untrained model: only the constraint makes these boxes
        assert 0 <= x0 < x1 <= picture.width and 0 <= y0 < y1 <= picture.height


def test_ground_reads_the_box_from_location_tokens_in_the_pictures_own_size(micro_nextmm, tokenizer, monkeypatch):
    from PIL import Image as PILImage

    from nextmm.api import NextMM

    wide = PILImage.new("RGB", (126, 63), "white")
    bins = tokenizer.location_ids((0.0, 0.5, 0.5, 1.0), 1)  # bins 0, 32, 32, 63 of 0..63
    monkeypatch.setattr(NextMM, "generate_ids", lambda self, prompts, max_new_tokens=32, answers=None: [bins] * len(prompts))
    boxes = micro_nextmm.ground([wide], ["a red circle"])
    assert boxes[0] == pytest.approx((0.0, 32 / 63 * 63, 32 / 63 * 126, 63.0))


def test_match_is_a_yes_no_answer(micro_nextmm, scenes):
    said = micro_nextmm.match([s.image() for s in scenes[:3]], [s.caption() for s in scenes[:3]])
    assert len(said) == 3 and all(isinstance(x, bool) for x in said)
    with pytest.raises(ValueError, match="one text per image"):
        micro_nextmm.match([scenes[0].image()], [])


def test_uncalibrated_match_answers_as_yes_no_constrained_decoding_does(micro_nextmm, scenes):
    from nextmm.data.sample import Image, Text, matching_question

    images, texts = [s.image() for s in scenes[:4]] * 2, [s.caption() for s in scenes[:8]]  # fitting, then not
    answers = micro_nextmm.generate([[Image(i), Text(matching_question(t), target=False)] for i, t in zip(images, texts)], answers=["yes", "no"])
    assert micro_nextmm.match(images, texts) == [a == "yes" for a in answers]


def test_calibrated_match_takes_away_a_bias_shared_by_the_question(micro_nextmm, scenes, monkeypatch):
    """Contextual calibration: the yes-minus-no margin less the margin for the same picture and an empty text,
    so a yes (or no) the model gives every pair alike does not decide its answers."""
    import nextmm.api

    images, texts = [s.image() for s in scenes[:4]] * 2, [s.caption() for s in scenes[:8]]  # fitting, then not
    plain, calibrated = micro_nextmm.match(images, texts), micro_nextmm.match(images, texts, calibrate=True)
    yes, no = micro_nextmm.tokenizer.encode("yes"), micro_nextmm.tokenizer.encode("no")
    yes = next(a for a, b in zip(yes, no) if a != b)  # where the two answers part
    unbiased = nextmm.api.next_token_logits

    def biased(*args, **kwargs):
        scores = unbiased(*args, **kwargs).clone()
        scores[:, yes] += 100.0
        return scores

    monkeypatch.setattr(nextmm.api, "next_token_logits", biased)
    assert micro_nextmm.match(images, texts) == [True] * 8 != plain
    assert micro_nextmm.match(images, texts, calibrate=True) == calibrated != [True] * 8


def test_the_evals_matching_answers_are_what_match_says(micro_nextmm):
    from nextmm.worlds.shapes import generator as shapes
    from nextmm.worlds.shapes.evaluation import matching_answers

    said, said_calibrated, truth = matching_answers(micro_nextmm, 12, seed=5)
    samples = list(shapes.make_samples("itm", 5, 12))
    images, texts = [s.segments[0].image for s in samples], [s.meta["caption"] for s in samples]
    assert said.tolist() == micro_nextmm.match(images, texts)
    assert said_calibrated.tolist() == micro_nextmm.match(images, texts, calibrate=True)
    assert truth.tolist() == [s.meta["answer"] == "yes" for s in samples] and 0 < truth.sum() < 12
