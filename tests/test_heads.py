"""The extension interface (heads/base.py): a head added through it alone reaches the model's input, final
hidden states, next-token scores, loss and regression, in training and in cached decoding alike; with no head
the model computes the paper's loss by hand."""

import torch
import torch.nn.functional as F
from torch import nn

from nextmm.api import build_model
from nextmm.config import make_config
from nextmm.data.sample import Image, Text
from nextmm.data.sequence import SequenceBuilder
from nextmm.generate import Stepper, generate_ids
from nextmm.heads.base import Decoding, Head, Reading
from nextmm.models.emu import IGNORE


class Nudge(Head):
    """Adds a direction to every word's input and to every final hidden state, raises one token's score, moves
    the regressed embeddings and has a loss term: each visible in what the model computes."""

    def __init__(self, width: int, visual_width: int, token: int):
        super().__init__()
        self.direction = nn.Parameter(torch.randn(width))
        self.shift = nn.Parameter(torch.randn(visual_width))
        self.token = token

    def input(self, reading: Reading) -> torch.Tensor:
        return reading.is_word[..., None] * self.direction.float()

    def top(self, reading: Reading) -> torch.Tensor:
        return torch.ones(*reading.input_ids.shape, 1) * self.direction.float()

    def logits(self, reading, hidden, which, logits):
        return logits + 5.0 * F.one_hot(torch.tensor(self.token), logits.shape[-1])

    def losses(self, reading, hidden, labels, extras):
        return {"nudge": self.direction.square().mean() * extras.get("scale", 1.0)}

    def regress(self, reading, at, slots, predicted):
        return predicted + self.shift

    def decoding(self, reading: Reading) -> Decoding:
        return Nudging(self, reading)


class Nudging(Decoding):
    def __init__(self, head: Nudge, reading: Reading):
        self.head, self.heads, self.positions = head, reading.heads, reading.input_ids.shape[1]

    def token(self, previous, token):
        self.positions += 1
        return self.heads.is_word(token)[:, None] * self.head.direction.float()

    def embedding(self):
        self.positions += 1

    def top(self, positions):
        return self.head.direction.float().expand(1, positions, -1)

    def logits(self, hidden, logits):
        return logits + 5.0 * F.one_hot(torch.tensor(self.head.token), logits.shape[-1])

    def regress(self, slot, predicted):
        return predicted + self.head.shift


def plain_model(tokenizer):
    cfg = make_config("micro", overrides=[f"heads.{name}=false" for name in ("location", "copy", "presence", "agreement")])
    torch.manual_seed(0)
    return cfg, build_model(cfg, tokenizer)


def test_with_no_head_the_loss_is_the_papers_cross_entropy_plus_lambda_l2(tokenizer, scenes):
    cfg, model = plain_model(tokenizer)
    assert len(model.heads) == 0
    b = SequenceBuilder.for_config(tokenizer, cfg)
    batch = b.collate([b.encode([Image(s.image()), Text(s.caption(), target=True)]) for s in scenes[:3]])
    ids, labels, pixels = batch["input_ids"], batch["labels"], batch["pixels"]
    out = model.loss(ids, labels, pixels, regression_weight=0.3)
    # by hand: the tower, the causal transformer, the slots filled, the LLM, the two heads
    visual = model.resampler(model.vision(pixels))
    embeds = model.llm.embed_tokens(ids).masked_scatter((ids == tokenizer.image_id)[..., None], model.visual_proj(visual).reshape(-1, cfg.llm.width))
    hidden = model.llm(embeds)
    ce = F.cross_entropy(model.llm.lm_head(hidden[labels != IGNORE]), labels[labels != IGNORE])
    before_slot = torch.zeros_like(ids, dtype=torch.bool)
    before_slot[:, :-1] = ids[:, 1:] == tokenizer.image_id  # [IMG] and every <image> but the last
    l2 = F.mse_loss(model.regression_head(hidden[before_slot]), visual.reshape(-1, visual.shape[-1]))
    torch.testing.assert_close(out["ce"], ce)
    torch.testing.assert_close(out["l2"], l2)
    torch.testing.assert_close(out["loss"], ce + 0.3 * l2)


def test_a_head_added_through_the_interface_reaches_training_and_cached_decoding_alike(tokenizer, scenes):
    cfg, model = plain_model(tokenizer)
    b = SequenceBuilder.for_config(tokenizer, cfg)
    batch = b.collate([b.encode([Image(s.image()), Text(s.caption(), target=True)]) for s in scenes[:2]])
    ids, labels, pixels = batch["input_ids"], batch["labels"], batch["pixels"]
    plain = model.loss(ids, labels, pixels, head_weight=0.5)
    red = tokenizer.encode("red")[0]
    model.heads["nudge"] = Nudge(cfg.llm.width, cfg.visual_width, red)
    nudged = model.loss(ids, labels, pixels, head_weight=0.5, extras={"scale": 2.0})
    nudge = 2.0 * model.heads.nudge.direction.square().mean()
    torch.testing.assert_close(nudged["nudge"], nudge)
    torch.testing.assert_close(nudged["text"], nudged["ce"] + 0.5 * nudge)
    assert not torch.isclose(nudged["ce"], plain["ce"]) and not torch.isclose(nudged["l2"], plain["l2"])
    nudged["loss"].backward()
    assert model.heads.nudge.direction.grad.abs().sum() > 0 and model.heads.nudge.shift.grad.abs().sum() > 0
    assert "nudge" not in model.loss(ids, labels, pixels)  # head_weight 0 asks for no head's loss
    # decoding: at every step, the cached path's scores are those the whole sequence gives
    model.eval()
    prompts = [[Image(scenes[i].image()), Text("a picture of", target=False)] for i in range(2)]
    with torch.no_grad():
        written = generate_ids(model, b, prompts, max_new_tokens=5)
        for i, prompt in enumerate(prompts):
            encoded = b.encode(prompt, close=False)
            encoded.add(written[i][:4])
            whole = b.collate([encoded])
            visual, patches = model.see(whole["pixels"])
            reading = model.read(whole["input_ids"], visual, patches)
            hidden = model(whole["input_ids"], visual, reading=reading)
            last = torch.zeros_like(whole["input_ids"], dtype=torch.bool)
            last[0, -1] = True
            stepper = Stepper(model, b.collate([b.encode(prompt, close=False)]), 4, True, "fp32")
            h = stepper.prefill()
            for token in written[i][:4]:
                h = stepper.append_token(torch.tensor([token]))
            torch.testing.assert_close(stepper.logits(h), model.logits(hidden, reading, last), atol=1e-4, rtol=1e-4)
    # the regressed embeddings move by the head's shift
    from nextmm.generate import generate_visual

    with torch.no_grad():
        drawn = generate_visual(model, b, [[Text("a red circle", target=False)]])
        del model.heads["nudge"]
        unshifted = generate_visual(model, b, [[Text("a red circle", target=False)]])
    assert not torch.allclose(drawn, unshifted)
