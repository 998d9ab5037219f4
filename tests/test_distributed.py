"""Data-parallel training (train/parallel.py) on the CPU with gloo and 2 processes: the same losses as one process
over the same global batch, each rank its own part of every batch, and the settings two processes cannot run
with said in one sentence."""

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
from nextmm.train import parallel
from nextmm.train.stages import pretrain_objective, train, train_tokenizer

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


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """3 steps in one process and in two, then each resumed for 2 more."""
    root = tmp_path_factory.mktemp("runs")
    one, two = root / "one", root / "two"
    train(make_config("micro", overrides=SETTINGS + ["pretrain.steps=3"]), data_dir, one)
    two_processes(data_dir, two, 3)
    train(make_config("micro", overrides=SETTINGS + ["pretrain.steps=5"]), data_dir, one, resume=True)
    two_processes(data_dir, two, 5, "--resume")
    return losses(one), losses(two)


def test_two_processes_train_with_the_losses_of_one_over_the_same_global_batch(runs):
    one, two = runs
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4, 5]
    assert {"ce", "l2"} <= one[0].keys()
    assert any(r["ce"] == 0 for r in one) and any(r["ce"] > 0 for r in one)  # text-to-image batches (L2 alone) and others
    for a, b in zip(one, two):
        for key in ("loss", "ce", "l2"):  # metrics.jsonl rounds them to 5 decimals: 1e-5 apart, and its rounding
            assert b[key] == pytest.approx(a[key], abs=2e-5), (a["step"], key)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], abs=2e-4)  # rounded to 4
    # steps 4 and 5 come after a resume: they match only if every rank took up the data where it stopped (step 4)
    # and the optimizer's moments (step 5); the weights rank 0 loaded DDP would give the others anyway


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


def gradient(data_dir, tokenizer: Path, part) -> tuple[dict, dict]:
    """Stage 1's loss terms and gradients over a batch of binding episodes (4 to 6 pictures each: with seed 1 the
    ranks' parts hold 20 and 21, and differ in labelled words too), through parallel.wrap as the Trainer does."""
    cfg = make_config("micro", overrides=SETTINGS)
    tok = NextTokenizer.load(tokenizer)
    cfg.llm.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = build_model(cfg, tok)
    builder = SequenceBuilder.for_config(tok, cfg)
    sources = {"binding": discover_sources(data_dir)["binding"]}
    batch = MixedStream(sources, {}, lambda s: builder.encode(s.segments), builder.collate, 8, seed=1, part=part).next_batch()
    _, loss_fn, backward = pretrain_objective(model, cfg.pretrain)
    objective = parallel.wrap(model, loss_fn)  # kept: its backward needs the DDP wrapper alive
    out = objective(batch)
    backward(out, 1.0)
    terms = parallel.mean_over_ranks({k: float(v.detach()) for k, v in out.items()})
    return terms, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _rank(rank: int, port: int, data_dir: str, tokenizer: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with parallel.session("cpu", timeout_s=60):
        assert parallel.part() == (rank, 2)
        Path(out, f"keys{rank}.json").write_text(json.dumps(reading(data_dir, parallel.part())))
        terms, grads = gradient(data_dir, Path(tokenizer), parallel.part())
        Path(out, f"terms{rank}.json").write_text(json.dumps(terms))
        save_file(grads, str(Path(out, f"grads{rank}.safetensors")))
        torch.manual_seed(5)
        parallel.own_randomness()
        Path(out, f"noise{rank}.json").write_text(json.dumps(torch.rand(4).tolist()))


@pytest.fixture(scope="module")
def two_ranks(data_dir, tmp_path_factory):
    """What each of two processes spawned here read, and the loss and gradients they computed."""
    out = tmp_path_factory.mktemp("ranks")
    train_tokenizer(discover_sources(data_dir), make_config("micro")).save(out / "tokenizer.json")
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
    for rank in range(2):
        assert json.loads((two_ranks / f"terms{rank}.json").read_text()) == pytest.approx(terms, abs=1e-6)
        theirs = load_file(str(two_ranks / f"grads{rank}.safetensors"))
        assert theirs.keys() == grads.keys() and any(name.startswith("regression_head") for name in grads)
        for name, grad in grads.items():
            torch.testing.assert_close(theirs[name], grad, rtol=1e-4, atol=1e-6 * float(grad.abs().max()), msg=name)


def test_the_ranks_draw_their_own_noise_from_one_seed(two_ranks):
    noise = [json.loads((two_ranks / f"noise{rank}.json").read_text()) for rank in range(2)]
    assert noise[0] != noise[1]
    torch.manual_seed(5)
    parallel.own_randomness()  # one process keeps its stream
    assert torch.rand(4).tolist() == pytest.approx(torch.manual_seed(5) and torch.rand(4).tolist())


def test_two_processes_train_the_visual_decoder_each_on_its_part(data_dir, tmp_path):
    decoder = ("diffusion.steps=3", "autoencoder.steps=3", "autoencoder.batch_size=4", "diffusion.batch_size=4",
               "autoencoder.time_budget_s=0", "diffusion.time_budget_s=0", "autoencoder.log_every=1", "diffusion.log_every=1",
               "decoder.semantic_token=false")
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
