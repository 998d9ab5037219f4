"""Data-parallel training (train/parallel.py), whole in each process (DDP) or sharded (FSDP2, train/parallelize.py),
on the CPU with gloo and 2 processes: the same losses and gradients as one process over the same global batch, each
rank its own part of every batch, sharded checkpoints that resume on 2 processes and on 1, and the settings two
processes cannot run with said in one sentence."""

import shutil

import json
import os
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from safetensors.torch import load_file, save_file

import nextmm
from nextmm.api import build_model
from nextmm.cli import main
from nextmm.config import make_config
from nextmm.data.loader import LeftOut, MixedStream, discover_sources
from nextmm.data.make import write_shapes
from nextmm.data.sequence import SequenceBuilder
from nextmm.data.shards import DataError
from nextmm.tokenizer import NextTokenizer
from nextmm.train import parallel, parallelize
from nextmm.train.checkpoint import load_checkpoint, save_checkpoint
from nextmm.train.stages import freeze_parts, pretrain_groups, pretrain_objective, train, train_tokenizer

# With seed 0 the mix below draws text-to-image, VQA, binding, binding: L2 alone, then CE and L2.
DATA = {"caption": 40, "vqa": 6, "binding": 6}
# The paper's model: the heads' own loss terms are averaged over ranks as they are, which matches one process
# only approximately (parallel.py), and the copy head's running mean follows rank 0's pictures.
HEADS_OFF = [f"heads.{h}=false" for h in ("location", "pointer", "pointer_words", "pointer_roles", "copy", "presence", "agreement")]
SETTINGS = HEADS_OFF + [
    "clip.steps=0", "diffusion.steps=0", "pretrain.batch_size=8", "pretrain.time_budget_s=0", "pretrain.log_every=1",
    "pretrain.precision=fp32", "pretrain.join_at={}", "pretrain.mix={binding: 3, caption: 1, vqa: 1, text_to_image: 1}",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, DATA, seed=0, shard_size=20)
    return root


def losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]


def two_processes(data_dir: Path, out: Path, steps: int, *extra: str, settings: tuple[str, ...] = ()) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(nextmm.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "nextmm.cli", "train", "--nproc", "2", "--data", str(data_dir), "--out", str(out),
               "--preset", "micro", "--timeout", "60", *extra]
    for setting in SETTINGS + [f"pretrain.steps={steps}", *settings]:
        command += ["--set", setting]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def one_process(data_dir: Path, out: Path, steps: int, resume: bool = False) -> None:
    train(make_config("micro", overrides=SETTINGS + [f"pretrain.steps={steps}"]), data_dir, out, resume=resume)


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """3 steps in one process and in two, then each resumed for 2 more."""
    root = tmp_path_factory.mktemp("runs")
    one, two = root / "one", root / "two"
    one_process(data_dir, one, 3)
    two_processes(data_dir, two, 3)
    one_process(data_dir, one, 5, resume=True)
    two_processes(data_dir, two, 5, "--resume")
    return losses(one), losses(two)


@pytest.fixture(scope="module")
def sharded_runs(data_dir, tmp_path_factory):
    """3 steps in two processes with FSDP, then resumed for 2 more in two processes with FSDP and in one."""
    root = tmp_path_factory.mktemp("sharded")
    two_processes(data_dir, root / "three", 3, "--fsdp")
    shutil.copytree(root / "three", root / "two")
    two_processes(data_dir, root / "two", 5, "--fsdp", "--resume")
    shutil.copytree(root / "three", root / "one")
    one_process(data_dir, root / "one", 5, resume=True)
    return root


def assert_same_losses(one: list[dict], other: list[dict]) -> None:
    assert [r["step"] for r in one] == [r["step"] for r in other]
    for a, b in zip(one, other):
        for key in ("loss", "ce", "l2"):  # metrics.jsonl rounds them to 5 decimals: 1e-5 apart, and its rounding
            assert b[key] == pytest.approx(a[key], abs=2e-5), (a["step"], key)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], abs=2e-4)  # rounded to 4


def test_two_processes_train_with_the_losses_of_one_over_the_same_global_batch(runs):
    one, two = runs
    assert [r["step"] for r in one] == [1, 2, 3, 4, 5]
    assert {"ce", "l2"} <= one[0].keys()
    assert any(r["ce"] == 0 for r in one) and any(r["ce"] > 0 for r in one)  # text-to-image batches (L2 alone) and others
    assert_same_losses(one, two)
    # steps 4 and 5 come after a resume: they match only if every rank took up the data where it stopped (step 4)
    # and the optimizer's moments (step 5); the weights rank 0 loaded DDP would give the others anyway


def test_sharded_processes_train_and_resume_on_two_or_one_with_the_losses_of_one(runs, sharded_runs):
    one, _ = runs
    assert_same_losses(one[:3], losses(sharded_runs / "three"))
    assert [p.name for p in (sharded_runs / "three" / "pretrain" / "checkpoints" / "step-0000003" / "shards").iterdir() if p.suffix == ".distcp"]
    # steps 4 and 5: the shards read back (on two processes) or resharded into one whole model (on one), the
    # optimizer's moments with them
    assert_same_losses(one, losses(sharded_runs / "two"))
    assert_same_losses(one, losses(sharded_runs / "one"))
    exported = load_file(str(sharded_runs / "two" / "model" / "model.safetensors"))  # gathered whole from the shards
    assert exported.keys() == load_file(str(sharded_runs / "one" / "model" / "model.safetensors")).keys()


def test_a_stage_one_checkpoint_exports_as_a_model_directory(sharded_runs, tmp_path, capsys):
    """A sharded checkpoint (read whole in one process) and a one-file one; the run's model after the same 3 steps."""
    run = sharded_runs / "three"
    expected = load_file(str(run / "model" / "model.safetensors"))
    for checkpoint in (run / "pretrain" / "checkpoints" / "step-0000003", sharded_runs / "one" / "pretrain" / "checkpoints"):
        out = tmp_path / checkpoint.parent.parent.parent.name
        assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) in (0, None)
        exported = load_file(str(out / "model.safetensors"))
        assert exported.keys() == expected.keys()
        if checkpoint.name == "step-0000003":
            assert all(torch.equal(exported[k], expected[k]) for k in expected)
        else:  # the latest of the run resumed to step 5
            assert not all(torch.equal(exported[k], expected[k]) for k in expected)
        assert len(nextmm.load(out).complete([["a red"]], max_new_tokens=2)) == 1  # the folder loads and writes
    assert main(["export", "--checkpoint", str(run / "pretrain"), "--out", str(tmp_path / "x")]) == 2
    assert "is not a training checkpoint of a nextmm run" in capsys.readouterr().err


def reading(data_dir, part, batches: int = 3) -> list[list[str]]:
    """The sample keys of each batch a rank trains on, from within one epoch of two sources; the stage leaves
    about a third of the samples out."""

    def item(sample):
        if zlib.crc32(sample.key.encode()) % 3 == 0:
            raise LeftOut("a third of the samples")
        return sample.key

    sources = {name: path for name, path in discover_sources(data_dir).items() if name in ("caption", "vqa")}
    stream = MixedStream(sources, {}, item, lambda keys: {"keys": keys}, 8, seed=3, part=part)
    return [stream.next_batch()["keys"] for _ in range(batches)]


def micro(tokenizer: Path, sharding: str = "ddp", heads: bool = False) -> tuple:
    settings = SETTINGS if not heads else [s for s in SETTINGS if s not in HEADS_OFF]
    cfg = make_config("micro", overrides=settings + [f"pretrain.sharding={sharding}"])
    tok = NextTokenizer.load(tokenizer)
    cfg.llm.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    return cfg, tok, build_model(cfg, tok)


def gradient(data_dir, tokenizer: Path, part, sharding: str = "ddp", heads: bool = False) -> tuple[dict, dict]:
    """Stage 1's loss terms (the last micro-batch's) and gradients over two micro-batches of binding episodes (4 to
    6 pictures each: with seed 1 the ranks' parts of the first hold 20 and 21, and differ in labelled words too),
    through parallel.wrap or the sharded root as the Trainer runs them (CE and L2 both: the sharded backward takes
    two passes)."""
    cfg, tok, model = micro(tokenizer, sharding, heads)
    builder = SequenceBuilder.for_config(tok, cfg)
    sources = {"binding": discover_sources(data_dir)["binding"]}
    stream = MixedStream(sources, {}, lambda s: builder.encode(s.segments), builder.collate, 8, seed=1, part=part)
    _, loss_fn, backward = pretrain_objective(model, cfg.pretrain)
    objective = parallelize.prepare(model, loss_fn, cfg.pretrain, "fp32")
    if objective is None:
        objective = parallel.wrap(model, loss_fn)  # kept: its backward needs the DDP wrapper alive
    for step in range(2):  # two micro-batches accumulated as the Trainer does, reduced over the ranks with the last
        with parallel.syncing(objective, last=step == 1):
            out = objective(stream.next_batch())
            backward(out, 0.5)
    parallel.reduce_unsharded(objective)
    terms = parallel.mean_over_ranks({k: float(v.detach()) for k, v in out.items()})
    return terms, {name: whole(p.grad).clone() for name, p in model.named_parameters() if p.grad is not None}


def whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def sharded_optimizer(tokenizer: Path, sharding: str) -> tuple:
    """A micro model, sharded or not, with stage 1's optimizer over its (sharded) parameters."""
    cfg, _, model = micro(tokenizer, sharding)
    freeze_parts(model, cfg.pretrain)
    parallelize.prepare(model, lambda batch: batch, cfg.pretrain, "fp32")
    return model, torch.optim.AdamW(pretrain_groups(model, cfg.pretrain))


def whole_checkpoint(tokenizer: Path, out: Path) -> dict:
    """A one-process checkpoint of a micro model after one optimizer step, and its tensors and moments by name."""
    model, optimizer = sharded_optimizer(tokenizer, "ddp")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    save_checkpoint(out, 1, {"model": model}, optimizer, {"step": 1})
    return {**{n: p.detach() for n, p in model.named_parameters()}, **{f"{n}.exp_avg": optimizer.state[p]["exp_avg"] for n, p in model.named_parameters()}}


def _rank(rank: int, port: int, data_dir: str, tokenizer: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with parallel.session("cpu", timeout_s=60):
        assert parallel.part() == (rank, 2)
        Path(out, f"keys{rank}.json").write_text(json.dumps(reading(data_dir, parallel.part())))
        terms, grads = gradient(data_dir, Path(tokenizer), parallel.part())
        Path(out, f"terms{rank}.json").write_text(json.dumps(terms))
        save_file(grads, str(Path(out, f"grads{rank}.safetensors")))
        terms, grads = gradient(data_dir, Path(tokenizer), parallel.part(), "fsdp")
        Path(out, f"sharded_terms{rank}.json").write_text(json.dumps(terms))
        save_file(grads, str(Path(out, f"sharded_grads{rank}.safetensors")))
        for sharding in ("ddp", "fsdp"):  # with the heads: their 0-dim parameters, parameters one rank's part does not reach
            terms, grads = gradient(data_dir, Path(tokenizer), parallel.part(), sharding, heads=True)
            Path(out, f"{sharding}_heads_terms{rank}.json").write_text(json.dumps(terms))
            save_file(grads, str(Path(out, f"{sharding}_heads_grads{rank}.safetensors")))
        # a one-process checkpoint read into a sharded model: each rank keeps its part of the weights and moments
        model, optimizer = sharded_optimizer(Path(tokenizer), "fsdp")
        load_checkpoint(Path(out, "whole", "step-0000001"), {"model": model}, optimizer)
        held = {n: p.to_local().numel() for n, p in model.named_parameters()}
        loaded = {**{n: p.full_tensor() for n, p in model.named_parameters()},
                  **{f"{n}.exp_avg": optimizer.state[p]["exp_avg"].full_tensor() for n, p in model.named_parameters()}}
        Path(out, f"held{rank}.json").write_text(json.dumps(held))
        save_file(loaded, str(Path(out, f"loaded{rank}.safetensors")))
        torch.manual_seed(5)
        parallel.own_randomness()
        Path(out, f"noise{rank}.json").write_text(json.dumps(torch.rand(4).tolist()))


@pytest.fixture(scope="module")
def two_ranks(data_dir, tmp_path_factory):
    """What each of two processes spawned here read, and the loss and gradients they computed."""
    out = tmp_path_factory.mktemp("ranks")
    train_tokenizer(discover_sources(data_dir), make_config("micro")).save(out / "tokenizer.json")
    save_file(whole_checkpoint(out / "tokenizer.json", out / "whole"), str(out / "whole.safetensors"))
    mp.spawn(_rank, args=(free_port(), str(data_dir), str(out / "tokenizer.json"), str(out)), nprocs=2)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_each_rank_trains_on_its_own_part_of_every_global_batch(data_dir, two_ranks):
    ranks = [json.loads((two_ranks / f"keys{r}.json").read_text()) for r in range(2)]
    whole = reading(data_dir, (0, 1))
    for first, second, batch in zip(*ranks, whole):
        assert len(first) == len(second) == 4
        assert not set(first) & set(second)
        assert first + second == batch
    assert len({key for batch in whole for key in batch}) == 3 * 8  # no sample twice


def test_the_gradient_of_two_processes_is_that_of_one_over_the_same_global_batch(data_dir, two_ranks):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank computes: with more threads the sums come in another order
    try:
        terms, grads = gradient(data_dir, two_ranks / "tokenizer.json", (0, 1))
    finally:
        torch.set_num_threads(threads)
    for kind in ("", "sharded_"):  # DDP's, and FSDP's gathered whole
        for rank in range(2):
            assert json.loads((two_ranks / f"{kind}terms{rank}.json").read_text()) == pytest.approx(terms, abs=1e-6)
            theirs = load_file(str(two_ranks / f"{kind}grads{rank}.safetensors"))
            assert theirs.keys() == grads.keys() and any(name.startswith("regression_head") for name in grads)
            for name, grad in grads.items():
                torch.testing.assert_close(theirs[name], grad, rtol=1e-4, atol=1e-6 * float(grad.abs().max()), msg=kind + name)


def test_with_the_heads_sharded_processes_compute_the_gradient_of_ddp(two_ranks):
    """The heads' terms are not exactly one process's (above); FSDP's must be DDP's."""
    for rank in range(2):
        ddp, fsdp = (json.loads((two_ranks / f"{kind}_heads_terms{rank}.json").read_text()) for kind in ("ddp", "fsdp"))
        assert fsdp == pytest.approx(ddp, abs=1e-6)
        ddp, fsdp = (load_file(str(two_ranks / f"{kind}_heads_grads{rank}.safetensors")) for kind in ("ddp", "fsdp"))
        # FSDP reduces a zero gradient for a parameter the batch did not reach, where DDP leaves none
        assert ddp.keys() <= fsdp.keys() and {"heads.copy.same_token", "heads.location.log_sharpness"} <= ddp.keys()
        for name, grad in fsdp.items():
            expected = ddp.get(name, torch.zeros_like(grad))
            # the heads' gradients sum in other orders under the two: a few 1e-5 of the largest apart
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=3e-5 * float(expected.abs().max()), msg=name)


def test_each_sharded_rank_holds_half_of_the_parameters(two_ranks):
    held = [json.loads((two_ranks / f"held{rank}.json").read_text()) for rank in range(2)]
    _, _, model = micro(two_ranks / "tokenizer.json")
    total = {n: p.numel() for n, p in model.named_parameters()}
    assert held[0].keys() == total.keys()
    for name, numel in total.items():  # dim 0 split in two, the first part the larger where it is odd
        assert held[0][name] + held[1][name] == numel and held[0][name] >= held[1][name], name
    assert 0.49 < sum(held[1].values()) / sum(total.values()) <= 0.5


def test_a_whole_checkpoint_resumes_sharded(two_ranks):
    """What one process saved, read into a model sharded between two (1 process -> 2): the weights and AdamW's
    moments of every rank's parts, gathered back, are the saved ones."""
    saved = load_file(str(two_ranks / "whole.safetensors"))
    for rank in range(2):
        loaded = load_file(str(two_ranks / f"loaded{rank}.safetensors"))
        assert loaded.keys() == saved.keys()
        for name, tensor in saved.items():
            torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)


def test_the_ranks_draw_their_own_noise_from_one_seed(two_ranks):
    noise = [json.loads((two_ranks / f"noise{rank}.json").read_text()) for rank in range(2)]
    assert noise[0] != noise[1]
    torch.manual_seed(5)
    parallel.own_randomness()  # one process keeps its stream
    assert torch.rand(4).tolist() == pytest.approx(torch.manual_seed(5) and torch.rand(4).tolist())


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])  # after FSDP every rank gathers the whole model for stage 2
def test_two_processes_train_the_visual_decoder_each_on_its_part(data_dir, tmp_path, sharding):
    decoder = ("diffusion.steps=3", "autoencoder.steps=3", "autoencoder.batch_size=4", "diffusion.batch_size=4",
               "autoencoder.time_budget_s=0", "diffusion.time_budget_s=0", "autoencoder.log_every=1", "diffusion.log_every=1",
               "decoder.semantic_token=false", f"pretrain.sharding={sharding}")
    two_processes(data_dir, tmp_path, 1, settings=decoder)
    for stage in ("autoencoder", "diffusion"):
        records = [json.loads(line) for line in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss"] > 0 for r in records)
        assert json.loads((tmp_path / stage / "done.json").read_text())["samples"] == 3 * 4  # each rank 2 of every 4
    scale = json.loads((tmp_path / "autoencoder" / "done.json").read_text())["latent_scale"]
    model = nextmm.load(tmp_path / "model")
    assert model.decoder.vae.config.scaling_factor == pytest.approx(scale)


def test_a_world_size_that_does_not_divide_the_batch_is_one_sentence(data_dir, tmp_path, capsys):
    code = main(["train", "--data", str(data_dir), "--out", str(tmp_path), "--preset", "micro", "--nproc", "3", "--set", "pretrain.batch_size=8"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not (tmp_path / "pretrain").exists()
    assert err == "nextmm: error: pretrain.batch_size=8 does not split evenly among 3 processes; set it to a multiple of 3"
    code = main(["train", "--data", str(data_dir), "--out", str(tmp_path), "--preset", "micro", "--nproc", "2", "--set", "pretrain.batch_size=8",
                 "--set", "diffusion.batch_size=5"])
    assert code == 2 and capsys.readouterr().err.strip().endswith("diffusion.batch_size=5 does not split evenly among 2 processes; set it to a multiple of 2")
    with pytest.raises(DataError, match=r"^a batch of 8 samples does not split evenly among 3 processes; make it a multiple of 3$"):
        MixedStream(discover_sources(data_dir), {}, str, list, 8, part=(0, 3))


def test_one_process_is_the_plain_path():
    assert not parallel.launched() and parallel.part() == (0, 1) and parallel.is_main()
    loss_fn = lambda batch: batch  # noqa: E731
    assert parallel.wrap(torch.nn.Linear(1, 1), loss_fn) is loss_fn
    assert parallel.mean_over_ranks({"loss": 1.5}) == {"loss": 1.5} and parallel.max_over_ranks(2.0) == 2.0


def _dying(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        with parallel.session("cpu", timeout_s=20):
            parallel.sum_over_ranks([1.0])  # both alive
            if rank == 1:
                os._exit(1)  # dies mid-step, as a killed process does
            parallel.sum_over_ranks([2.0])
    except parallel.ParallelError as err:
        Path(out, "said.txt").write_text(str(err))


def test_a_rank_that_dies_stops_the_others_with_one_sentence(tmp_path):
    ctx = mp.get_context("spawn")
    port = free_port()
    ranks = [ctx.Process(target=_dying, args=(rank, port, str(tmp_path))) for rank in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=90)
    assert [p.exitcode for p in ranks] == [0, 1]  # rank 0 ended by itself, with its sentence, long before the timeout
    said = (tmp_path / "said.txt").read_text()
    assert said.startswith("process 0 of 2 stops because another one died or did not answer within 20 s (--timeout): ")
    assert "\n" not in said
