import io
import json
import shutil
import tarfile

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from nextmm import api
from nextmm.config import TrainConfig, make_config
from nextmm.data.make import write_shapes
from nextmm.train import loop
from nextmm.train.checkpoint import CheckpointMismatch, latest_checkpoint
from nextmm.train.stages import train

SMALL = {"caption": 48, "vqa": 6, "video_qa": 4, "binding": 6}


def micro_cfg(**pretrain):
    cfg = make_config("micro", overrides=["clip.steps=3", "clip.batch_size=16", "pretrain.batch_size=8", "pretrain.ckpt_every=3",
                                          "clip.time_budget_s=0", "pretrain.time_budget_s=0", "pretrain.log_every=1",
                                          "autoencoder.steps=3", "autoencoder.time_budget_s=0", "autoencoder.batch_size=4",
                                          "diffusion.steps=4", "diffusion.time_budget_s=0", "diffusion.batch_size=4",
                                          "diffusion.ckpt_every=2"])
    for key, value in pretrain.items():
        setattr(cfg.pretrain, key, value)
    return cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, SMALL, seed=0, shard_size=20)
    return root


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    assert loop.lr_factor(0.0, 0.1, 0.1) < 0.01
    assert loop.lr_factor(0.1, 0.1, 0.1) == pytest.approx(1.0)
    assert loop.lr_factor(0.55, 0.1, 0.1) == pytest.approx(0.55, abs=0.01)
    assert loop.lr_factor(1.0, 0.1, 0.1) == pytest.approx(0.1)


def test_train_writes_a_loadable_model_and_metrics(tmp_path, data_dir):
    result = train(micro_cfg(steps=4), data_dir, tmp_path)
    m = api.load(result["model"])
    assert len(m.caption([Image.new("RGB", (64, 64), "white")])) == 1
    records = [json.loads(line) for line in (tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["tokens_per_s"] > 0 and "ce" in r and "l2" in r for r in records)
    ckpt = latest_checkpoint(tmp_path / "pretrain" / "checkpoints")
    assert {p.name for p in ckpt.iterdir()} >= {"model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "state.json"}


def straight_and_killed_then_resumed(tmp_path, data_dir, monkeypatch, stage: str, kill_at: int, steps: int) -> tuple[dict, dict]:
    """One uninterrupted run, and one killed right after `stage` saved step `kill_at`, then resumed."""
    straight = train(micro_cfg(steps=steps), data_dir, tmp_path / "a")
    real_save = loop.save_checkpoint

    def save_then_die(root, step, *args, **kwargs):
        path = real_save(root, step, *args, **kwargs)
        if stage in str(root) and step == kill_at:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(micro_cfg(steps=steps), data_dir, tmp_path / "b")
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    return straight, train(micro_cfg(steps=steps), data_dir, tmp_path / "b", resume=True)


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, data_dir, monkeypatch):
    straight, resumed = straight_and_killed_then_resumed(tmp_path, data_dir, monkeypatch, "pretrain", 3, 6)
    a = load_file(f"{straight['model']}/model.safetensors")
    b = load_file(f"{resumed['model']}/model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_run_killed_in_stage_2_resumes_to_the_same_decoder(tmp_path, data_dir, monkeypatch):
    runs = straight_and_killed_then_resumed(tmp_path, data_dir, monkeypatch, "diffusion", 2, 2)
    straight, resumed = (api.load(run["model"]).decoder for run in runs)
    assert resumed.latent_scale == straight.latent_scale != 1.0  # calibrated, and kept across the resume
    assert straight.semantic_width == 32 and straight.readout_regressed_weight.abs().sum() > 0  # fitted, saved, loaded
    a, b = straight.state_dict(), resumed.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)


def test_a_stage_trained_further_on_resume_restarts_the_stages_built_on_it(tmp_path, data_dir):
    train(micro_cfg(steps=2), data_dir, tmp_path)
    first_unet = load_file(str(latest_checkpoint(tmp_path / "diffusion" / "checkpoints") / "model.safetensors"))
    again = train(micro_cfg(steps=2), data_dir, tmp_path, resume=True)  # nothing raised: every stage is loaded
    assert not (tmp_path / "diffusion.old").exists()
    for name, value in api.load(again["model"]).decoder.state_dict().items():
        if name in first_unet:
            torch.testing.assert_close(value, first_unet[name], msg=name)

    cfg = micro_cfg(steps=2)
    cfg.autoencoder.steps, cfg.diffusion.log_every = 5, 1  # the VAE trains 2 more steps, so the UNet, fitted to its old latents, starts afresh
    train(cfg, data_dir, tmp_path, resume=True)
    assert json.loads((tmp_path / "autoencoder" / "done.json").read_text())["step"] == 5
    assert (tmp_path / "diffusion.old" / "done.json").is_file()  # the earlier UNet, kept aside
    steps = [json.loads(line)["step"] for line in (tmp_path / "diffusion" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # trained from its first step, not continued
    assert not (tmp_path / "pretrain.old").exists()  # stage 1 is not built on the VAE


def test_corrupt_samples_are_skipped_counted_and_training_goes_on(tmp_path, data_dir):
    bad = tmp_path / "data"
    shutil.copytree(data_dir, bad)
    shard = sorted((bad / "caption").glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, payload in members:
            if member.name.endswith(".png") and "0000001" in member.name:
                payload = b"not a png at all"
                member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    train(micro_cfg(steps=5), bad, tmp_path / "run")
    done = json.loads((tmp_path / "run" / "pretrain" / "done.json").read_text())
    assert done["step"] == 5
    assert done["data"]["skipped"] >= 1 and done["data"]["errors"]


def test_stage0_keeps_only_captions_within_max_caption_words(data_dir, tokenizer):
    from nextmm.data.loader import MixedStream
    from nextmm.train.stages import ClipBatches

    cfg = micro_cfg()
    assert cfg.clip.max_caption_words == 4  # the Shapes World presets train stage 0 on one-object captions
    batches = ClipBatches(tokenizer, cfg)
    captions = []
    stream = MixedStream({"caption": data_dir / "caption"}, {}, batches.item, lambda items: items, 8)
    for _ in range(4):
        captions += [text for _, text in stream.next_batch()]
    assert all(len(text.split()) == 4 for text in captions)
    assert stream.report()["left_out"] > 0 and stream.report()["skipped"] == 0


def test_with_a_time_budget_the_progress_bar_counts_the_budgets_seconds():
    budgeted = loop.ProgressBar("pretrain", TrainConfig(steps=3000, time_budget_s=270), 0, 0.0)
    assert (budgeted.bar.total, budgeted.bar.unit) == (270, "s")
    budgeted.update(12, 41.6, {"loss": 1.0})
    assert budgeted.bar.n == 42 and budgeted.bar.postfix.startswith("step=12")
    budgeted.update(900, 999.0, {})
    assert budgeted.bar.n == 270  # a stage ending late still fills the bar, not past it
    budgeted.close()
    by_steps = loop.ProgressBar("pretrain", micro_cfg().pretrain, 0, 0.0)
    by_steps.update(3, 1.0, {})
    assert (by_steps.bar.total, by_steps.bar.unit, by_steps.bar.n) == (1000, "step", 3)
    by_steps.close()


def test_raising_a_finished_stages_limit_and_resuming_continues_it_from_where_it_stopped(tmp_path, data_dir):
    first = train(micro_cfg(steps=4), data_dir, tmp_path)
    before = load_file(f"{first['model']}/decoder/unet/diffusion_pytorch_model.safetensors")
    longer = micro_cfg(steps=4)
    longer.diffusion.steps = 6
    result = train(longer, data_dir, tmp_path, resume=True)
    steps = lambda stage: [json.loads(line)["step"] for line in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert steps("pretrain") == [1, 2, 3, 4]  # finished within its limits: loaded, not re-run
    assert steps("diffusion") == [4, 6]  # logged at each run's last step: 4, then 5 and 6 on top of it
    assert json.loads((tmp_path / "diffusion" / "done.json").read_text())["step"] == 6
    after = load_file(f"{result['model']}/decoder/unet/diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(before[name], after[name]) for name in before)
    train(longer, data_dir, tmp_path, resume=True)  # at its limits now: nothing more to do
    assert steps("diffusion") == [4, 6]
    longer.decoder.semantic_grid = 0  # another decoder than the one trained: one clear sentence, nothing lost
    with pytest.raises(CheckpointMismatch, match=r"diffusion/checkpoints/step-0000006/model.safetensors' was trained with another config"):
        train(longer, data_dir, tmp_path, resume=True)
    assert json.loads((tmp_path / "diffusion" / "done.json").read_text())["step"] == 6


def test_gradients_clipped_apart_do_not_shrink_everyone_elses_step(tmp_path):
    class Still:
        def next_batch(self):
            return {"valid": torch.ones(1, 1, dtype=torch.bool), "pixels": torch.zeros(0, 3, 8, 8)}

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

        def report(self):
            return {"skipped": 0, "errors": [], "left_out": 0}

    x = torch.tensor([[3.0, 4.0]])
    grads = {}
    for apart in ((), ("loud.",)):
        torch.manual_seed(0)
        model = torch.nn.ModuleDict({"quiet": torch.nn.Linear(2, 1, bias=False), "loud": torch.nn.Linear(2, 1, bias=False)})
        cfg = TrainConfig(steps=1, lr=0.0, warmup_steps=0, log_every=1, ckpt_every=100, grad_clip=10.0, precision="fp32")
        trainer = loop.Trainer("t", model, lambda b: {"loss": model["quiet"](x).sum() + 1000 * model["loud"](x).sum()},
                               cfg, tmp_path / str(len(apart)), clip_apart=apart)
        step = trainer.optimizer.step
        trainer.optimizer.step = lambda: (grads.__setitem__(apart, {n: p.grad.clone() for n, p in model.named_parameters()}), step())
        trainer.run(Still())
        logged = json.loads((tmp_path / str(len(apart)) / "metrics.jsonl").read_text().splitlines()[0])["grad_norm"]
        assert logged == pytest.approx(5.0 if apart else 5000.0, rel=1e-4)  # |x| = 5 for the quiet layer, 1000x for the loud
    together, apart = grads[()], grads[("loud.",)]
    torch.testing.assert_close(together["quiet.weight"], x * 10 / 5000)  # clipped with the loud layer: shrunk 500-fold
    torch.testing.assert_close(apart["quiet.weight"], x)  # under the limit on its own: untouched
    assert apart["loud.weight"].norm() == pytest.approx(10.0, rel=1e-4)


def test_stage1_trains_the_vision_tower_slower_and_the_copy_gate_presence_probe_and_agreement_judge_faster(micro_model, micro_config):
    from nextmm.train.stages import pretrain_groups

    p = micro_config.pretrain
    groups = pretrain_groups(micro_model, p)
    lr_of = {id(param): g["lr"] for g in groups for param in g["params"]}
    named = dict(micro_model.named_parameters())
    assert lr_of[id(named["heads.copy.gate.weight"])] == lr_of[id(named["heads.copy.gate_on_proposal.weight"])] == p.lr * p.copy_gate_lr_scale
    assert lr_of[id(named["heads.copy.query.weight"])] == lr_of[id(named["llm.embed_tokens.weight"])] == p.lr
    assert lr_of[id(next(v for k, v in named.items() if k.startswith("vision.")))] == p.lr * p.vision_lr_scale
    assert p.copy_gate_lr_scale > 1 > p.vision_lr_scale
    probe = [lr_of[id(named[f"heads.{part}.weight"])] for part in ("presence.query", "presence.key", "presence.calibrate", "agreement.gate", "agreement.judge")]
    assert probe == [p.lr * p.presence_lr_scale] * 5 and p.presence_lr_scale > 1
    assert lr_of[id(named["heads.presence.found"])] == lr_of[id(named["heads.agreement.holds"])] == p.lr
    assert sorted(lr_of) == sorted(id(v) for v in micro_model.parameters() if v.requires_grad)  # every parameter, once


def test_a_caption_read_text_first_keeps_its_regions_on_its_image(micro_config, tokenizer):
    from nextmm.data.sequence import SequenceBuilder
    from nextmm.train.stages import text_first
    from nextmm.worlds.shapes import generator as shapes

    builder = SequenceBuilder.for_config(tokenizer, micro_config)
    for caption in shapes.make_samples("caption", 4, 10):
        flipped = text_first(caption)
        assert flipped.named_box() is None and flipped.regions() == shapes.object_regions(flipped)
        assert len(builder.encode(flipped.segments, named=flipped.named_box(), regions=flipped.regions()).regions) == len(caption.regions())
