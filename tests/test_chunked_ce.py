"""The chunked cross-entropy (models/chunked_ce.py) gives the loss and gradients of the whole one, and Emu.loss
uses it only where nothing else reads the scores."""

import torch
import torch.nn.functional as F

from nextmm.api import build_model
from nextmm.config import make_config
from nextmm.data.sample import Image, Text
from nextmm.data.sequence import SequenceBuilder
from nextmm.models.chunked_ce import chunked_cross_entropy


def test_chunks_give_the_whole_cross_entropy_and_its_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(23, 16, requires_grad=True)  # 23 rows: the last chunk is short
    labels = torch.randint(0, 50, (23,))
    whole = F.cross_entropy(head(hidden), labels)
    whole.backward()
    expected = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    chunked = chunked_cross_entropy(head, hidden, labels, rows=5)
    chunked.backward()
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(hidden.grad, expected[0])
    torch.testing.assert_close(head.weight.grad, expected[1])


def test_emu_loss_chunks_its_cross_entropy_where_no_head_changes_the_scores(tokenizer, scenes):
    cfg = make_config("micro", overrides=[f"heads.{name}=false" for name in ("location", "copy", "presence", "agreement")])
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    b = SequenceBuilder.for_config(tokenizer, cfg)
    batch = b.collate([b.encode([Image(s.image()), Text(s.caption(), target=True)]) for s in scenes[:3]])
    args = batch["input_ids"], batch["labels"], batch["pixels"]
    calls = []
    handle = model.llm.lm_head.register_forward_hook(lambda module, inputs, output: calls.append(output.shape[0]))
    whole = model.loss(*args)
    whole["loss"].backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    labelled = int((batch["labels"] != -100).sum())
    calls.clear()
    chunked = model.loss(*args, ce_chunk=7)
    assert calls == [7] * (labelled // 7) + ([labelled % 7] if labelled % 7 else [])  # no row's logits beyond its chunk
    chunked["loss"].backward()
    handle.remove()
    torch.testing.assert_close(chunked["ce"], whole["ce"])
    for name, p in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(p.grad, expected[name], msg=name)


def test_a_head_that_changes_the_scores_keeps_the_whole_logits(micro_model, tokenizer, scenes):
    b = SequenceBuilder.for_config(tokenizer, micro_model.cfg)
    batch = b.collate([b.encode([Image(s.image()), Text(s.caption(), target=True)]) for s in scenes[:2]])
    args = batch["input_ids"], batch["labels"], batch["pixels"]
    assert micro_model.heads.change_scores
    torch.testing.assert_close(micro_model.loss(*args, ce_chunk=3)["ce"], micro_model.loss(*args)["ce"])
