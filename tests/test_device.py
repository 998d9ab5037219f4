"""Devices: `auto` picks what is present, a device that is not there is one clear sentence, and the model,
its decoder and every input follow the device the model is on."""

import pytest
import torch

from nextmm.cli import main
from nextmm.device import DeviceError, device_of, pick_device, present, to_device


def test_auto_picks_the_best_present_device():
    assert pick_device("auto") == torch.device(present()[0])
    assert present()[-1] == "cpu"


@pytest.mark.parametrize("name", ["cuda:7", "tpu", "cuda:x"])
def test_a_device_that_is_not_there_is_named(name):
    if name == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has an eighth GPU")
    with pytest.raises(DeviceError, match=name):
        pick_device(name)


def test_to_device_moves_tensors_and_keeps_the_rest():
    batch = {"ids": torch.ones(2, dtype=torch.long), "captions": ["a", None]}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["captions"] == ["a", None] and torch.equal(moved["ids"], batch["ids"])


def test_loading_on_a_missing_device_says_so_before_reading_anything(capsys, tmp_path):
    code = main(["caption", "--model", str(tmp_path / "nowhere"), "--device", "cuda:9", "x.png"])
    err = capsys.readouterr().err
    if torch.cuda.device_count() > 9:
        pytest.skip("this machine has a tenth GPU")
    assert code == 2 and "cuda:9" in err and "nowhere" not in err and "Traceback" not in err


def test_a_model_moved_with_to_keeps_its_answers(micro_nextmm, scenes):
    before = micro_nextmm.caption([s.image() for s in scenes[:2]], max_new_tokens=4)
    micro_nextmm.to("cpu")
    assert device_of(micro_nextmm.model) == torch.device("cpu") == micro_nextmm.device
    assert micro_nextmm.caption([s.image() for s in scenes[:2]], max_new_tokens=4) == before


def test_every_head_trains_and_decodes_under_bf16_autocast(micro_nextmm, micro_config, tokenizer, scenes):
    """CPUs with native bf16 (and GPUs) compute in it by default (precision=auto): every head must take it."""
    from nextmm.data.sample import Image, Text
    from nextmm.data.sequence import SequenceBuilder
    from nextmm.precision import autocast

    builder = SequenceBuilder.for_config(tokenizer, micro_config)
    batch = builder.collate([builder.encode([Image(s.image()), Text(s.caption(), target=True)], claim=True) for s in scenes[:4]])
    model = micro_nextmm.model.train()
    with autocast("bf16"):
        out = model.loss(batch["input_ids"], batch["labels"], batch["pixels"], head_weight=1.0, extras={"claims": batch["claims"]})
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and "agreement" in out
    micro_nextmm.precision = "bf16"
    assert len(micro_nextmm.caption([s.image() for s in scenes[:2]], max_new_tokens=4)) == 2
