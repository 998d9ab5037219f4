import pytest
import torch

from conftest import shapes_texts
from nextmm.api import build_model
from nextmm.data.sample import Image, Text
from nextmm.generate import Stepper
from nextmm.heads.agreement import Judging
from nextmm.heads.presence import Probing
from nextmm.tokenizer import NextTokenizer
from nextmm.train.stages import text_first
from nextmm.worlds.shapes import generator as shapes
from test_model import bag_test_batch, builder_for


def _scramble(model) -> None:
    """Probe, gate and both directions away from their starting values, so every part shows."""
    with torch.no_grad():
        for weight in (model.heads.presence.query.weight, model.heads.presence.found, model.heads.agreement.gate.weight, model.heads.agreement.holds, model.heads.agreement.holds_at_top):
            torch.nn.init.normal_(weight, std=0.5)
        model.heads.agreement.judge.weight.fill_(1.5)


def test_the_agreement_judge_keeps_a_gated_soft_minimum_of_the_reads_since_the_latest_picture(micro_model, tokenizer):
    _, batch = bag_test_batch(micro_model, tokenizer, "story")  # a detection sample and a story of several pictures
    _scramble(micro_model)
    ids = batch["input_ids"]
    model = micro_model
    with torch.no_grad():
        visual, _ = model.see(batch["pixels"])
        reading = model.read(ids, visual)
        told = model.heads.input(reading)
        sums, (seen, reads) = reading.notes["agreed"], reading.notes["presence"]
        image_index = reading.latest_image
        gates = torch.sigmoid(model.heads.agreement.gate(model.llm.embed_tokens(ids)).squeeze(-1))
        verdicts = model.heads.agreement.verdict(sums)
    slots = ids == model.image_token_id
    judged = 0
    for row in range(len(ids)):
        for t in range(ids.shape[1]):
            start = max([j for j in range(t + 1) if slots[row, j]] + [0])
            counted = [j for j in range(start, t + 1) if seen[row, j]]
            if not counted:
                assert sums[row, t, 1] == float("-inf") and verdicts[row, t] == 0
                continue
            g, reads_here = gates[row, counted], reads[row, counted]
            soft_min = -torch.log((g * torch.exp(-reads_here)).sum() / g.sum())
            torch.testing.assert_close(verdicts[row, t], 1.5 * soft_min + model.heads.agreement.judge.bias[0])
            judged += 1
    assert judged > 20 and (told[slots] == 0).all()
    # generation: one token at a time, as over the whole sequence (the latest image told at each step, which
    # decoding keeps fixed: new pictures end it)
    with torch.no_grad():
        first = model.read(ids[:, :1], visual)
        model.heads.input(first)
        probing, judging = (s for s in model.heads.decoding(first) if isinstance(s, (Probing, Judging)))
        for t in range(1, ids.shape[1]):
            probing.image_index = image_index[:, t]
            told_here = probing.token(ids[:, t - 1], ids[:, t]) + judging.token(ids[:, t - 1], ids[:, t])
            torch.testing.assert_close(judging.sums, sums[:, t])
            torch.testing.assert_close(told_here, told[:, t])


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_reads_the_verdict_as_training_does_word_by_word(micro_model, tokenizer, scenes, use_cache):
    _scramble(micro_model)
    micro_model.eval()
    b = builder_for(micro_model, tokenizer)
    text = 'does the text "a large red circle above a small blue square" match the image? yes'
    whole = b.collate([b.encode([Image(scenes[0].image()), Text(text, target=False)], close=False)])
    ids = whole["input_ids"]
    prompt_len = int((ids[0] == micro_model.image_token_id).nonzero()[-1]) + 4  # the picture and a few words
    with torch.no_grad():
        visual, _ = micro_model.see(whole["pixels"])
        trained = micro_model(ids, visual)
        reading = micro_model.read(ids, visual)
        micro_model.heads.input(reading)
        at_top = micro_model.heads.top(reading)
        assert (at_top[0, prompt_len - 1 :].norm(dim=-1) > 0).all()  # the verdict reaches every position compared
        prompt = {"input_ids": ids[:, :prompt_len], "valid": whole["valid"][:, :prompt_len], "pixels": whole["pixels"]}
        stepper = Stepper(micro_model, prompt, ids.shape[1] - prompt_len, use_cache, "fp32")
        torch.testing.assert_close(stepper.prefill()[0], trained[0, prompt_len - 1], atol=1e-4, rtol=1e-4)
        for t in range(prompt_len, ids.shape[1]):
            torch.testing.assert_close(stepper.append_token(ids[:, t])[0], trained[0, t], atol=1e-4, rtol=1e-4)


def test_the_agreement_judge_learns_to_count_the_reads_that_end_a_phrase_and_tells_a_false_caption(micro_config):
    """Synthetic pictures of two objects, a trained presence probe, and questions whose text holds or has one
    phrase wrong: trained by agreement_loss alone, the verdict tells them apart, where the soft minimum of all
    reads (every gate equal) could not, since most words end no phrase."""
    tokenizer = NextTokenizer.train(shapes_texts(), vocab_size=1000, location_bins=64)  # whole words: a gate per word
    micro_config.llm.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    model = build_model(micro_config, tokenizer)
    slots, width = model.num_queries, model.cfg.resampler.width
    colour_looks, shape_looks = torch.randn(3, width), torch.randn(3, width)
    colour_ids = [tokenizer.encode(f" {word}") for word in ("red", "green", "blue")]
    shape_ids = [tokenizer.encode(f" {word}") for word in ("circle", "square", "triangle")]

    def pictures(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        visual = torch.randn(n, slots, width) * 0.3
        spots = torch.stack([torch.randperm(slots)[:2] for _ in range(n)])
        colour = torch.stack([torch.randperm(3)[:2] for _ in range(n)])
        shape = torch.stack([torch.randperm(3)[:2] for _ in range(n)])
        visual[torch.arange(n)[:, None], spots] += colour_looks[colour] + shape_looks[shape]
        return visual, colour, shape

    def region_ids(colour: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        phrases = [torch.tensor(colour_ids[c] + shape_ids[s]) for c, s in zip(colour.flatten(), shape.flatten())]
        return torch.nn.utils.rnn.pad_sequence(phrases, batch_first=True, padding_value=-1)

    def questions(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """n pictures, each with a question whose text holds (claims 1) or names the first object with the second's
        shape (claims 0): (n, T) ids, (n,) claims, the visual embeddings."""
        visual, colour, shape = pictures(n)
        holds = torch.rand(n) < 0.5
        rows = []
        for i in range(n):
            first = shape[i, 0] if holds[i] else shape[i, 1]
            said = colour_ids[colour[i, 0]] + shape_ids[first] + tokenizer.encode(" and") + colour_ids[colour[i, 1]] + shape_ids[shape[i, 1]]
            rows.append([model.image_token_id] * slots + tokenizer.encode('does the text "') + said + tokenizer.encode('" match the image?'))
        width_ = max(map(len, rows))
        ids = torch.tensor([r + [tokenizer.pad_id] * (width_ - len(r)) for r in rows])
        valid = torch.tensor([[True] * len(r) + [False] * (width_ - len(r)) for r in rows])
        return ids, valid, holds.long(), visual

    probe_optimizer = torch.optim.Adam(model.heads.presence.parameters(), lr=0.015)
    for _ in range(200):
        visual, colour, shape = pictures(32)
        loss = model.heads.presence.presence_loss(model.read(torch.zeros(0, 0, dtype=torch.long), visual), region_ids(colour, shape), torch.arange(32).repeat_interleave(2))
        probe_optimizer.zero_grad()
        loss.backward()
        probe_optimizer.step()

    def accuracy() -> float:
        ids, valid, claims, visual = questions(300)
        with torch.no_grad():
            reading = model.read(ids, visual)
            model.heads.input(reading)
            sums = reading.notes["agreed"]
            last = valid.long().sum(1) - 1
            verdict = model.heads.agreement.verdict(sums[torch.arange(len(ids)), last])
        return ((verdict > 0) == (claims == 1)).float().mean().item()

    before = accuracy()
    optimizer = torch.optim.Adam([*model.heads.agreement.gate.parameters(), *model.heads.agreement.judge.parameters()], lr=0.05)
    for _ in range(120):
        ids, valid, claims, visual = questions(16)
        loss = model.heads.agreement.agreement_loss(model.read(ids, visual), valid, claims)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = accuracy()
    assert after > 0.85 and after > before + 0.15, (before, after)


def test_captions_and_matching_answers_make_claims_that_reach_the_loss(micro_model, tokenizer):
    b = builder_for(micro_model, tokenizer)
    caption = next(iter(shapes.make_samples("caption", 0, 1)))
    matching = list(shapes.make_samples("itm", 0, 12))
    vqa = next(iter(shapes.make_samples("vqa", 0, 1)))
    samples = [caption, *matching, vqa, text_first(caption)]
    batch = b.collate([b.encode(s.segments, claim=s.claim()) for s in samples])
    said = [m.meta["answer"] == "yes" for m in matching]
    assert batch["claims"].tolist() == [1, *map(int, said), -1, -1] and 0 < sum(said) < len(said)
    args = (batch["input_ids"], batch["labels"], batch["pixels"])
    out = micro_model.loss(*args, head_weight=1.0, extras={"claims": batch["claims"], "valid": batch["valid"]})
    plain = micro_model.loss(*args, head_weight=1.0)
    visual, _ = micro_model.see(batch["pixels"])
    judge, reading = micro_model.heads.agreement, micro_model.read(batch["input_ids"], visual)
    agreement = judge.agreement_loss(reading, batch["valid"], batch["claims"])
    torch.testing.assert_close(out["agreement"], agreement)
    torch.testing.assert_close(out["text"], plain["text"] + agreement)
    assert "agreement" not in plain
    # nobody claims anything: no loss
    assert judge.agreement_loss(reading, batch["valid"], torch.full_like(batch["claims"], -1)) is None
