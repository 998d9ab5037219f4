import torch

from nextmm.data.sample import Image, Text
from nextmm.heads.words import PHRASE_DECAY, Words
from test_model import bag_test_batch, builder_for


def test_the_presence_probe_learns_whether_a_picture_holds_a_colour_and_a_shape_together(micro_model, tokenizer):
    torch.manual_seed(0)
    slots, width = micro_model.num_queries, micro_model.cfg.resampler.width
    colour_looks, shape_looks = torch.randn(3, width), torch.randn(3, width)
    colours, shape_words = torch.tensor(tokenizer.encode("red green blue")), torch.tensor(tokenizer.encode("circle square triangle"))

    def pictures(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """n pictures of two objects (each in one visual embedding, no colour or shape shared) -> their visual
        embeddings, each picture's two phrases (n, 2, 2) and its swapped phrase (the first's colour, the second's shape)."""
        visual = torch.randn(n, slots, width) * 0.3
        spots = torch.stack([torch.randperm(slots)[:2] for _ in range(n)])
        colour = torch.stack([torch.randperm(3)[:2] for _ in range(n)])
        shape = torch.stack([torch.randperm(3)[:2] for _ in range(n)])
        visual[torch.arange(n)[:, None], spots] += colour_looks[colour] + shape_looks[shape]
        phrases = torch.stack([colours[colour], shape_words[shape]], -1)
        swapped = torch.stack([colours[colour[:, 0]], shape_words[shape[:, 1]]], -1)
        return visual, phrases, swapped

    def accuracy(n: int = 300) -> float:
        visual, phrases, swapped = pictures(n)
        said = []
        with torch.no_grad():
            for ids, truth in ((phrases[:, 0], True), (swapped, False)):  # the swapped one has both words, apart
                terms = words._phrase_terms(ids, ids >= 0)
                bags = PHRASE_DECAY * terms[:, 0] + terms[:, 1]
                said.append((micro_model.heads.presence.phrase_logits(Words.mean(bags), visual, torch.arange(n)) > 0) == truth)
        return torch.cat(said).float().mean().item()

    words = micro_model.heads.words(micro_model.llm.embed_tokens)
    before = accuracy()
    optimizer = torch.optim.Adam(micro_model.heads.presence.parameters(), lr=0.015)  # stage 1's rate, x presence_lr_scale
    for _ in range(300):
        visual, phrases, _ = pictures(32)
        reading = micro_model.read(torch.zeros(0, 0, dtype=torch.long), visual)
        loss = micro_model.heads.presence.presence_loss(reading, phrases.flatten(0, 1), torch.arange(32).repeat_interleave(2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert accuracy() > 0.9 and before < 0.7


def test_phrase_bags_weigh_the_latest_words_most_restart_at_pictures_and_boxes_and_generation_keeps_them(micro_model, tokenizer):
    _, batch = bag_test_batch(micro_model, tokenizer, "story")
    ids = batch["input_ids"]
    words = micro_model.heads.words(micro_model.llm.embed_tokens)
    bags = words.phrase_bags(ids)
    terms = words._phrase_terms(ids, ~((ids == micro_model.image_token_id) | torch.isin(ids, micro_model.heads.location_ids)))
    is_image, is_box = ids == micro_model.image_token_id, torch.isin(ids, micro_model.heads.location_ids)
    for row in range(len(ids)):
        # a picture's slot, and a word right after a box, start a new phrase
        starts = [j for j in range(ids.shape[1]) if is_image[row, j] or (j > 0 and is_box[row, j - 1] and not is_box[row, j])]
        assert len(starts) > micro_model.num_queries
        for t in range(ids.shape[1]):
            start = max([j for j in starts if j <= t] + [0])
            by_hand = sum(PHRASE_DECAY ** (t - j) * terms[row, j] for j in range(start, t + 1))
            torch.testing.assert_close(bags[row, t], by_hand)
    stepped = bags[:, 0]
    for t in range(1, ids.shape[1]):
        stepped = words.next_phrase_bags(stepped, ids[:, t - 1], ids[:, t])
        torch.testing.assert_close(stepped, bags[:, t])
    phrase = torch.tensor(tokenizer.encode("a small red circle"))
    after_picture = words.phrase_bags(torch.cat([torch.tensor([micro_model.image_token_id]), phrase])[None])[0, -1]
    padded = torch.nn.functional.pad(phrase, (0, 3), value=-1)[None]
    torch.testing.assert_close(words.phrase_bags_of(padded)[0], after_picture)  # a phrase alone, as in a sequence


def test_what_the_presence_probe_tells_reaches_words_after_a_picture(micro_model, tokenizer, scenes):
    with torch.no_grad():
        torch.nn.init.normal_(micro_model.heads.presence.found, std=0.5)
        torch.nn.init.normal_(micro_model.heads.presence.query.weight)
    b = builder_for(micro_model, tokenizer)
    prompt = [Text("a picture:", target=False), Image(scenes[0].image()), Text("is there a red circle?", target=False)]
    batch = b.collate([b.encode(prompt, close=False)])
    ids = batch["input_ids"]
    visual, _ = micro_model.see(batch["pixels"])
    told = micro_model.heads.input(micro_model.read(ids, visual))[0].norm(dim=-1)
    first_slot = int((ids[0] == micro_model.image_token_id).nonzero()[0])
    slots = ids[0] == micro_model.image_token_id
    assert (told[:first_slot] == 0).all() and (told[slots] == 0).all()  # nothing before a picture, nothing on its slots
    assert (told[first_slot + micro_model.num_queries + 1 :] > 0).all()  # every word after it
