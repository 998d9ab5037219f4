import pytest
import torch

from nextmm import precision
from nextmm.errors import UserError


@pytest.mark.parametrize("bf16_faster, resolved", [(True, "bf16"), (False, "fp32")])
def test_auto_resolves_to_the_dtype_the_timing_probe_found_faster(monkeypatch, bf16_faster, resolved):
    # the probe's verdict is fixed here: its clock is another test's subject
    monkeypatch.setattr(precision, "bf16_is_faster", lambda device_type="cpu": bf16_faster)
    assert precision.resolve("auto") == resolved


def test_an_explicit_precision_resolves_to_itself():
    assert precision.resolve("fp32") == "fp32" and precision.resolve("bf16") == "bf16"


def test_the_probe_follows_the_clock(monkeypatch):
    # Each dtype's timing loop reads the clock twice; make bf16 take 1 s and fp32 5 s, then the reverse.
    for ticks, faster in (([0, 1, 0, 5], True), ([0, 5, 0, 1], False)):
        clock = iter(ticks)
        monkeypatch.setattr(precision.time, "perf_counter", lambda: next(clock))
        precision.bf16_is_faster.cache_clear()
        assert precision.bf16_is_faster() is faster
    precision.bf16_is_faster.cache_clear()


def test_autocast_computes_in_the_chosen_dtype():
    a = torch.randn(4, 4)
    with precision.autocast("bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with precision.autocast("fp32"):
        assert (a @ a).dtype == torch.float32


def test_an_unknown_precision_is_one_clear_error():
    with pytest.raises(UserError, match="precision 'fp16' is not one of auto, bf16, fp32"):
        precision.resolve("fp16")
