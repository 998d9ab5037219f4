"""Activation checkpointing and regional compile (train/parallelize.py) in one process: the same losses and
gradients as the plain model, the same state-dict names, and a compiler that does not work said in one sentence;
the settings and flags that ask for them and for FSDP2, and a sharded checkpoint's files (train/shards.py) read
back, or refused in one sentence when they are another model's. tests/test_distributed.py trains sharded."""

import copy
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch._dynamo.utils import counters

from nextmm.api import build_model
from nextmm.cli import main
from nextmm.config import ConfigError, make_config
from nextmm.train import parallelize, regression, shards
from nextmm.train.checkpoint import CheckpointMismatch, load_checkpoint, resume_weights
from test_regression import grads, scene_batch


def loss_and_grads(model, batch, one_pass: bool = False) -> tuple[float, dict]:
    """Through stage 1's default backward, two passes over one graph (train/regression.py), or in one pass
    (pretrain.regression_reaches_visual=true)."""
    model.zero_grad()
    out = model.loss(batch["input_ids"], batch["labels"], batch["pixels"], 0.5)
    if one_pass:
        out["loss"].backward()
    else:
        regression.backward(model, out)
    return float(out["loss"].detach()), grads(model)


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_keeps_losses_gradients_and_names(micro_model, tokenizer, every):
    batch = scene_batch(micro_model, tokenizer, 4)
    plain = copy.deepcopy(micro_model)
    names = list(micro_model.state_dict())
    parallelize.checkpoint_blocks(micro_model, every)
    assert list(micro_model.state_dict()) == names
    blocks = parallelize.blocks(micro_model)
    covered = [i for i, block in enumerate(blocks) if "forward" in vars(block)]
    assert covered == list(range(0, len(blocks), every)) and len(blocks) == 3  # the micro LLM's 2 blocks, the tower's 1
    runs = []  # each block's feed-forward, counted as it starts: a checkpointed block starts it again in the backward pass
    for block in blocks:
        mlp = getattr(block, "mlp")
        mlp.register_forward_pre_hook(lambda *_, i=len(runs): runs.__setitem__(i, runs[i] + 1))
        runs.append(0)
    loss, theirs = loss_and_grads(micro_model, batch)
    # stage 1's backward takes two passes through the LLM (the second down to the pictures) and one through the tower
    passes = [2, 2, 1]
    assert runs == [1 + passes[i] if i in covered else 1 for i in range(len(blocks))]
    expected_loss, expected = loss_and_grads(plain, batch)
    assert loss == expected_loss
    for name, grad in expected.items():
        torch.testing.assert_close(theirs[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    assert parallelize.release(micro_model, lambda: None) is micro_model
    assert not any("forward" in vars(block) for block in blocks)


def test_a_compiler_that_fails_is_one_sentence(monkeypatch):
    def broken(fn):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx\nmore lines")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(parallelize.CompileError, match=r"^torch.compile cannot build kernels on this machine \(InvalidCxxCompiler: No working C\+\+ "
                                                         r"compiler found in torch._inductor.config.cpp.cxx\); train without --compile \(pretrain.compile=false\)$"):
        parallelize.check_compiler(torch.device("cpu"))


def test_compiled_blocks_train_with_the_losses_of_eager_ones(micro_model, tokenizer):
    """Two optimizer steps on two batches of different lengths (the second compiles for dynamic shapes); tens of
    seconds the first time on a slow CPU, about one once inductor's cache holds the kernels."""
    eager = copy.deepcopy(micro_model)
    try:
        parallelize.compile_blocks(micro_model)
    except parallelize.CompileError as err:
        pytest.skip(str(err))
    graphs = counters["stats"]["unique_graphs"]
    losses = {}
    for name, model in (("compiled", micro_model), ("eager", eager)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[name] = []
        for n in (4, 6):
            loss, _ = loss_and_grads(model, scene_batch(model, tokenizer, n), one_pass=True)  # as compile requires
            optimizer.step()
            losses[name].append(loss)
    assert counters["stats"]["unique_graphs"] > graphs  # the blocks did run compiled
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5)
    parallelize.release(micro_model, lambda: None)
    assert not any("forward" in vars(block) for block in micro_model.llm.layers)


def test_the_settings_say_what_they_take(capsys):
    with pytest.raises(ConfigError, match=r"^config key 'pretrain.sharding' is 'zero3'; set it to one of ddp, fsdp$"):
        make_config("micro", overrides=["pretrain.sharding=zero3"])
    with pytest.raises(ConfigError, match=r"^config key 'pretrain.activation_checkpointing' is -1; set it to 0 \(off\), 1 \(every block\) or k \(every k-th block\)$"):
        make_config("micro", overrides=["pretrain.activation_checkpointing=-1"])
    with pytest.raises(ConfigError, match=r"^config key 'pretrain.compile' needs pretrain.regression_reaches_visual=true"):
        make_config("micro", overrides=["pretrain.compile=true"])
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--fsdp" in capsys.readouterr().out


def test_a_sharded_checkpoint_reads_back_or_says_it_is_another_models(micro_model, micro_config, tokenizer, tmp_path):
    """Written here by one process (as a sharded run's ranks write their parts together), read into a whole model."""
    optimizer = torch.optim.AdamW(micro_model.parameters())
    for p in micro_model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    checkpoint = tmp_path / "step-0000001"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP's note that it saves in one process
        shards.save(checkpoint / shards.DIR, {"model": micro_model}, optimizer)
    (checkpoint / "state.json").write_text('{"step": 1}')
    save_file({"torch": torch.get_rng_state()}, str(checkpoint / "rng.safetensors"))

    torch.manual_seed(1)
    again = build_model(micro_config, tokenizer)
    fresh = torch.optim.AdamW(again.parameters())
    assert load_checkpoint(checkpoint, {"model": again}, fresh) == {"step": 1}
    for (name, p), q in zip(micro_model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name
        assert torch.equal(optimizer.state[p]["exp_avg"], fresh.state[q]["exp_avg"]), name
    torch.manual_seed(2)
    weights = build_model(micro_config, tokenizer)
    resume_weights(weights, checkpoint)  # a finished stage's weights alone, as `--resume` loads them
    assert all(torch.equal(p, q) for p, q in zip(micro_model.parameters(), weights.parameters()))

    micro_config.llm.layers = 3
    other = build_model(micro_config, tokenizer)
    sentence = (rf"^checkpoint '{checkpoint}' was trained with another config \(it has no llm.layers.2.input_layernorm.weight\); resume with "
                r"the settings it was trained with, or train into a fresh --out$")
    with pytest.raises(CheckpointMismatch, match=sentence):
        load_checkpoint(checkpoint, {"model": other}, torch.optim.AdamW(other.parameters()))
    with pytest.raises(CheckpointMismatch, match=sentence):
        resume_weights(other, checkpoint)
