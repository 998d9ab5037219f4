"""Instruction tuning (`nextmm tune`, Emu-I's recipe): a trained model fine-tuned on conversations, with LoRA
adapters on its LLM through peft (tune.lora_*) or every weight of the LLM (tune.full), and stage 1's loss, which
learns the assistant's turns alone (their text, the [EOS] closing each, and the pictures it draws) since the
SequenceBuilder labels nothing else in a conversation.

Output layout of `nextmm tune --model M --data D --out M2`:
  M2/        with tune.save=merged: a model directory (`nextmm.load(M2)`), the adapters folded into the weights and
             M's decoder/ and clip.safetensors carried over; with tune.save=adapter: peft's adapter folder,
             adapter_config.json (whose base_model_name_or_path names M) and adapter_model.safetensors, which
             `nextmm.load(M2)` folds into M
  M2/tune/   metrics.jsonl, checkpoints/ (the weights tuning trains, with the optimizer: `TrainedWeights`), done.json,
             as a `nextmm train` stage's (`--resume` continues from them)
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from nextmm import api
from nextmm.config import Config, apply_overrides
from nextmm.data.loader import LeftOut, MixedStream, Prefetcher, discover_sources
from nextmm.data.sample import Sample, Turn
from nextmm.data.sequence import SequenceBuilder
from nextmm.device import on_gpu
from nextmm.errors import UserError
from nextmm.models.emu import Emu
from nextmm.models.llm import DecoderLayer
from nextmm.tokenizer import NextTokenizer
from nextmm.train.checkpoint import finished_stage, mark_stage_done, write_atomically
from nextmm.train.loop import StageResult, Trainer
from nextmm.train.stages import pretrain_objective

RUN = "tune"  # the run folder inside the output, kept when the model is written again
# The causal transformer as tune.train_resampler trains it: the layer norm before it (emu.visual_norm), the
# transformer and its projection to the LLM, as stage 1's resampler_lr_scale groups them.
VISUAL_PARTS = ("ln_visual", "resampler", "visual_proj")


class TuneError(UserError):
    pass


def block_linears(cfg: Config) -> list[str]:
    """The names of the linear layers in each block of the LLM: what LoRA can adapt. Read off a block built on the
    meta device, so that a wrong target is told before a large model is loaded."""
    with torch.device("meta"):
        block = DecoderLayer(cfg.llm)
    return sorted({name.rsplit(".", 1)[-1] for name, module in block.named_modules() if isinstance(module, nn.Linear)})


def lora_config(cfg: Config, whole: list[str] | None = None) -> LoraConfig:
    """peft's settings for tune.lora_*: the targets in the LLM's blocks alone (no other part of Emu shares their
    names by chance), and the modules that train `whole` beside the adapters."""
    t = cfg.tune
    have = block_linears(cfg)
    unknown = [name for name in t.lora_targets if name not in have]
    if unknown:
        raise TuneError(f"tune.lora_targets names {', '.join(repr(n) for n in unknown)}, which the model's LLM does not have; "
                        f"its blocks' linear layers are {', '.join(have)}")
    pattern = r"llm\.layers\.\d+\.(?:.*\.)?(?:" + "|".join(re.escape(name) for name in t.lora_targets) + ")"
    return LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, target_modules=pattern,
                      modules_to_save=whole)


def visual_parts(model: Emu) -> list[str]:
    return [name for name in VISUAL_PARTS if getattr(model, name) is not None]


def adapt(model: Emu, cfg: Config, base: Path) -> PeftModel | None:
    """Make trainable what tuning trains and freeze the rest. LoRA: peft injects the adapters into `model` in place
    (its modules keep their names, so the loss and generation run on it unchanged), and the PeftModel it returns
    saves and merges them; with tune.train_resampler the causal transformer trains too, as a copy that peft saves
    with the adapters (modules_to_save). tune.full: the LLM and its regression head train whole (None returned)."""
    t = cfg.tune
    if not t.full:
        adapted = get_peft_model(model, lora_config(cfg, visual_parts(model) if t.train_resampler else None))
        # Where the adapter folder's base model is, as peft records it (it would take the model's own name_or_path).
        adapted.peft_config["default"].base_model_name_or_path = str(base.resolve())
        return adapted
    model.requires_grad_(False)
    for part in [model.llm, model.regression_head] + ([getattr(model, name) for name in visual_parts(model)] if t.train_resampler else []):
        part.requires_grad_(True)
    return None


class TrainedWeights(nn.Module):
    """The weights tuning trains, as its checkpoints hold them: the adapters (or the LLM), not the frozen base that
    `nextmm tune --model` reloads, which for a large model would make each checkpoint the whole model again."""

    def __init__(self, model: Emu):
        super().__init__()
        self.of = [model]  # in a list, so that the model is not a submodule whose whole state_dict this would return

    def trained(self) -> dict[str, nn.Parameter]:
        return {name: param for name, param in self.of[0].named_parameters() if param.requires_grad}

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return {name: param.detach() for name, param in self.trained().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        trained = self.trained()
        missing, unexpected = sorted(set(trained) - set(state)), sorted(set(state) - set(trained))
        if missing or unexpected:  # worded as torch words it, which checkpoint.resume_module reads
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self.of[0]).__name__}:\n\t"
                               + (f"Missing key(s) in state_dict: {', '.join(missing[:3])}" if missing else f"Unexpected key(s) in state_dict: {', '.join(unexpected[:3])}"))
        with torch.no_grad():
            for name, param in trained.items():
                if param.shape != state[name].shape:
                    raise RuntimeError(f"Error(s) in loading state_dict:\n\tsize mismatch for {name}: {tuple(state[name].shape)} in the checkpoint, {tuple(param.shape)} here")
                param.copy_(state[name])


def conversation(sample: Sample) -> Sample:
    if not any(isinstance(segment, Turn) for segment in sample.segments):
        raise LeftOut(f"sample '{sample.key}' holds no conversation turns, which instruction tuning learns from "
                      "(write them with `nextmm data shapes --only --count conversation=N` or `nextmm data llava`)")
    return sample


def tune_stream(cfg: Config, tok: NextTokenizer, sources: dict[str, Path]) -> MixedStream:
    """Batches of conversations from every source, mixed evenly; samples without turns are left out and counted."""
    builder = SequenceBuilder.for_config(tok, cfg)
    return MixedStream(sources, {}, lambda s: builder.encode(conversation(s).segments), builder.collate, cfg.tune.batch_size, cfg.seed)


def fine_tune(m: api.NextMM, cfg: Config, sources: dict[str, Path], run_dir: Path, base: Path, resume: bool = False
              ) -> tuple[PeftModel | None, StageResult | None]:
    """Tune `m.model` in place on the sources' conversations; (the PeftModel around it in LoRA mode, the run's result,
    None when a finished run was loaded)."""
    torch.manual_seed(cfg.seed + 3)  # the adapters' initialisation
    model = m.model
    adapted = adapt(model, cfg, base)
    weights = TrainedWeights(model)
    if finished_stage(weights, run_dir, resume, cfg.tune) is not None:
        return adapted, None
    # Stage 1's loss and backward, without its EMA targets: tuning leaves the visual stack that makes the targets
    # frozen, or (tune.train_resampler) trains it by the text loss alone, as stage 1 does by default.
    _, loss_fn, backward = pretrain_objective(model, dataclasses.replace(cfg.pretrain, target_ema=0.0))
    trainer = Trainer(RUN, model, loss_fn, cfg.tune, run_dir, backward=backward, frozen_eval=True, checkpointed=weights)
    result = trainer.run(Prefetcher(tune_stream(cfg, m.tokenizer, sources), pin=on_gpu(model)), resume)
    mark_stage_done(run_dir, result)
    model.eval()
    return adapted, result


def save_tuned(m: api.NextMM, adapted: PeftModel | None, cfg: Config, out: Path, base: Path) -> Path:
    """The tuned model as tune.save asks, written whole into `out`, its run folder kept; an adapter folder records
    which weights of `base` it was tuned on (api.record_base)."""
    if cfg.tune.save == "adapter":
        def fill(tmp: Path) -> None:
            # No embedding rows are adapted, so peft need not look for a vocabulary change in the base model's files.
            adapted.save_pretrained(tmp, save_embedding_layers=False)
            api.record_base(tmp, base)

        return write_atomically(out, fill, keep=(RUN,))
    model = adapted.merge_and_unload() if adapted is not None else m.model
    return api.NextMM(model, m.tokenizer, cfg, decoder=m.decoder, clip=m.clip).save(out, keep=(RUN,))


# What `nextmm tune --set` may change: tuning's own settings, the loss's (stage 1's), the seed. The rest describes the
# trained model, which a setting cannot change without its weights.
TUNABLE = ("tune.", "pretrain.", "seed=")


def tune_settings(overrides: Sequence[str]) -> list[str]:
    for text in overrides:
        if not text.strip().startswith(TUNABLE):
            raise TuneError(f"setting '{text}' is not one tuning can change: it takes tune.*, pretrain.* (the loss) and seed, "
                            "the rest belonging to the trained model; give e.g. --set tune.lr=1e-4")
    return list(overrides)


def base_config(model_dir: Path) -> Config:
    """The config of a model directory, or of the model an adapter folder (one after another) was tuned from."""
    while (model_dir / api.ADAPTER_CONFIG).is_file():
        model_dir = api.adapter_base(model_dir)
    return api.saved_config(model_dir)


def tune(model_dir: str | Path, data_dir: str | Path, out_dir: str | Path, overrides: Sequence[str] = (), resume: bool = False,
         device: str = "auto") -> dict[str, Any]:
    """Tune the model in `model_dir` on the conversations in `data_dir` (a shard folder, or a folder of them) with its
    config's `tune` section and `overrides` (`tune.lr=1e-4`), into `out_dir` (the module's layout)."""
    base, out = Path(model_dir), Path(out_dir)
    if out.resolve() == base.resolve():
        raise TuneError(f"--out '{out}' is the model being tuned, which writing the tuned model would replace; give another folder")
    cfg = apply_overrides(base_config(base), tune_settings(overrides))
    if not cfg.tune.full:
        lora_config(cfg)  # a wrong target is told before the model loads
    sources = discover_sources(data_dir)
    m = api.load(base, device=device)
    m.config = cfg
    adapted, result = fine_tune(m, cfg, sources, out / RUN, base, resume)
    written = save_tuned(m, adapted, cfg, out, base)
    return {"model": str(written), "run": str(out / RUN), "steps": result.step if result is not None else None,
            "loss": result.last.get("loss") if result is not None else None}
