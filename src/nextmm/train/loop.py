"""One training loop for every stage: AdamW, warmup + cosine, clipping, accumulation, bf16 autocast where faster,
JSON-lines metrics, a progress bar, atomic checkpoints and `--resume`. It trains on whichever device the
model is on, and moves each batch there.

A stage supplies its modules, a loss function over a batch, and a batch stream that can report and
restore its position, so a resumed run sees exactly the batches it would have seen.

Under torchrun (train/parallel.py) every rank runs this loop on its part of each global batch, the model wrapped
in DistributedDataParallel or sharded by FSDP2 (train/parallelize.py): the loss function's terms must then come
scaled so that the average over ranks is the global batch's loss (stage 1's objective does). Only rank 0 writes
metrics and shows a bar, and checkpoints unless the model is sharded (then every rank writes its shards); every
rank loads a checkpoint when resuming.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn
from tqdm import tqdm

from nextmm.config import TrainConfig
from nextmm.device import device_of, to_device
from nextmm.precision import autocast, resolve
from nextmm.train import parallel
from nextmm.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


class BatchStream(Protocol):
    # A batch holds "valid" (B, T) and "pixels" (M, 3, H, W); a packed one (data/packing.py) also "documents" (B, T)
    # and "slots" (2,), the token slots one right-padded row per sample would take and those its rows take.
    def next_batch(self) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def report(self) -> dict[str, Any]: ...


def lr_factor(progress: float, warmup: float, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine to `min_ratio`; `progress` and `warmup` are fractions of the run."""
    if progress < warmup:
        return max(progress / warmup, 1e-3)
    span = max(1.0 - warmup, 1e-8)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / span)))
    return min_ratio + (1 - min_ratio) * cosine


def param_groups(model: nn.Module, lr: float, weight_decay: float, scales: dict[str, float] | None = None) -> list[dict]:
    """Decay matrices only (not norms, biases, embeddings' positions); `scales` multiplies the learning
    rate of parameters whose name starts with a given prefix (e.g. {"vision.": 0.1})."""
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((s for prefix, s in (scales or {}).items() if name.startswith(prefix)), 1.0)
        decay = p.ndim >= 2 and "pos" not in name.split(".")[-1] and name != "queries"
        groups.setdefault((scale, decay), []).append(p)
    return [
        {"params": ps, "lr": lr * scale, "base_lr": lr * scale, "weight_decay": weight_decay if decay else 0.0}
        for (scale, decay), ps in groups.items()
    ]


class ProgressBar:
    """A stage's tqdm bar. With a time budget it counts the budget's seconds, since the budget rather than
    the step cap usually ends the stage (a bar of 3000 steps showed an 18-minute ETA for a 270 s stage)."""

    def __init__(self, name: str, cfg: TrainConfig, step: int, elapsed: float, show: bool = True):
        self.by_time = cfg.time_budget_s > 0
        total, done, unit = (round(cfg.time_budget_s), round(elapsed), "s") if self.by_time else (cfg.steps, step, "step")
        self.bar = tqdm(total=total, initial=done, desc=name, unit=unit, dynamic_ncols=True, disable=not show)

    def update(self, step: int, elapsed: float, metrics: dict[str, float]) -> None:
        done = min(round(elapsed), self.bar.total) if self.by_time else step
        self.bar.update(done - self.bar.n)
        shown = {k: f"{v:.3f}" for k, v in metrics.items() if k in ("loss", "ce", "l2", "accuracy")}
        self.bar.set_postfix({"step": step, **shown} if self.by_time else shown)

    def close(self) -> None:
        self.bar.close()


@dataclass
class StageResult:
    step: int
    samples: int
    elapsed_s: float
    last: dict[str, float]
    checkpoint: Path | None
    data: dict[str, Any]


class Trainer:
    def __init__(
        self,
        name: str,
        model: nn.Module,
        loss_fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
        cfg: TrainConfig,
        out_dir: Path,
        groups: list[dict] | None = None,
        extra_modules: dict[str, nn.Module] | None = None,
        after_step: Callable[[], None] | None = None,
        backward: Callable[[dict[str, torch.Tensor], float], None] | None = None,
        clip_apart: tuple[str, ...] = (),
        objective: nn.Module | None = None,
        frozen_eval: bool = False,
        checkpointed: nn.Module | None = None,
    ):
        """`clip_apart`: prefixes of parameter names whose gradients are clipped to grad_clip on their own,
        so that a large gradient there does not shrink everyone else's step (the reported norm is the rest's).
        `objective`: the loss as the sharded root runs it (parallelize.prepare) when `model` is sharded; otherwise
        the loop wraps `loss_fn` itself (parallel.wrap). `frozen_eval`: the modules none of whose parameters train
        stay in eval mode, so that their running statistics (the copy head's picture mean) stay the frozen model's,
        as instruction tuning's adapters beside it expect. `checkpointed`: what a checkpoint keeps of the model, and
        resuming loads back (the model itself by default; tuning keeps the weights it trains, not the frozen base)."""
        self.name = name
        self.model = model
        self.loss_fn = loss_fn
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.modules = {"model": checkpointed if checkpointed is not None else model, **(extra_modules or {})}
        self.after_step = after_step
        self.objective = objective
        self.frozen_eval = frozen_eval
        self.optimizer = torch.optim.AdamW(
            groups or param_groups(model, cfg.lr, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95)
        )
        self.backward = backward or (lambda out, scale: (out["loss"] * scale).backward())
        named = list(model.named_parameters())  # startswith(()) is False: with no prefixes all are clipped together
        self.apart = [p for n, p in named if n.startswith(clip_apart)]
        self.clipped = [p for n, p in named if not n.startswith(clip_apart)]
        self.metrics_path = self.out_dir / "metrics.jsonl"

    def _progress(self, step: int, elapsed: float) -> float:
        # With a time budget the schedule follows whichever runs out first, so the learning rate has
        # decayed when the budget ends rather than being cut off at its peak.
        by_steps = step / self.cfg.steps
        by_time = elapsed / self.cfg.time_budget_s if self.cfg.time_budget_s > 0 else 0.0
        return min(1.0, max(by_steps, by_time))

    def _set_lr(self, progress: float) -> float:
        warmup = min(0.5, self.cfg.warmup_steps / max(self.cfg.steps, 1))
        factor = lr_factor(progress, warmup, self.cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return self.cfg.lr * factor

    def _checkpoint(self, step: int, samples: int, elapsed: float, stream: BatchStream) -> Path:
        state = {"stage": self.name, "step": step, "samples": samples, "elapsed_s": elapsed, "data": stream.state_dict()}
        return save_checkpoint(self.out_dir / "checkpoints", step, self.modules, self.optimizer, state)

    def _log(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def run(self, stream: BatchStream, resume: bool = False) -> StageResult:
        main = parallel.is_main()
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        step, samples, elapsed_before = 0, 0, 0.0
        if resume and (path := latest_checkpoint(self.out_dir / "checkpoints")) is not None:
            state = load_checkpoint(path, self.modules, self.optimizer)
            step, samples, elapsed_before = state["step"], state["samples"], state["elapsed_s"]
            stream.load_state_dict(state["data"])
            tqdm.write(f"[{self.name}] resumed from {path} at step {step}")
        parallel.own_randomness()
        device = device_of(self.model)
        # `auto` times matmuls in each process, and ranks could choose differently: rank 0's choice holds for all.
        precision = parallel.broadcast(resolve(self.cfg.precision, device.type))
        objective = self.objective if self.objective is not None else parallel.wrap(self.model, self.loss_fn)
        saves = main or parallel.is_sharded(self.model)  # a sharded model's checkpoint takes every rank's shards
        tqdm.write(f"[{self.name}] computing in {precision} on {device} (precision={self.cfg.precision})")
        start = time.perf_counter()
        window = {"t": start, "tokens": 0, "images": 0, "samples": 0, "padded": 0, "packed": 0}
        last: dict[str, float] = {}
        checkpoint = None
        bar = ProgressBar(self.name, self.cfg, step, elapsed_before, show=main)
        self.model.train()
        if self.frozen_eval:
            for module in self.model.modules():
                params = list(module.parameters())
                if params and not any(p.requires_grad for p in params):
                    module.eval()
        while step < self.cfg.steps:
            # Ranks' clocks differ: the slowest one's sets the schedule and the stop, so that every rank takes the
            # same learning rate and stops at the same step.
            elapsed = parallel.max_over_ranks(elapsed_before + time.perf_counter() - start)
            if self.cfg.time_budget_s > 0 and elapsed >= self.cfg.time_budget_s:
                tqdm.write(f"[{self.name}] time budget of {self.cfg.time_budget_s:.0f}s reached at step {step}")
                break
            lr = self._set_lr(self._progress(step, elapsed))
            sums: dict[str, float] = {}
            for micro in range(self.cfg.grad_accum):
                batch = to_device(stream.next_batch(), device)
                with parallel.syncing(objective, last=micro == self.cfg.grad_accum - 1):
                    with autocast(precision, device.type):
                        out = objective(batch)
                    self.backward(out, 1.0 / self.cfg.grad_accum)
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / self.cfg.grad_accum
                in_batch = int(batch["documents"].max()) + 1 if "documents" in batch else int(batch["valid"].shape[0])
                window["tokens"] += int(batch["valid"].sum())
                window["images"] += int(batch["pixels"].shape[0])
                window["samples"] += in_batch
                if "slots" in batch:
                    window["padded"], window["packed"] = window["padded"] + int(batch["slots"][0]), window["packed"] + int(batch["slots"][1])
                samples += in_batch * parallel.world()  # every rank's part is as large
            parallel.reduce_unsharded(objective)
            sums = parallel.mean_over_ranks(sums)
            if not math.isfinite(sums["loss"]):
                raise FloatingPointError(f"[{self.name}] loss became {sums['loss']} at step {step}; lower the learning rate")
            grad_norm = torch.nn.utils.clip_grad_norm_(self.clipped, self.cfg.grad_clip)  # sharded ones give a whole (replicated) DTensor
            if self.apart:
                torch.nn.utils.clip_grad_norm_(self.apart, self.cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.after_step is not None:
                self.after_step()
            step += 1
            last = {k: round(v, 5) for k, v in sums.items()}
            bar.update(step, elapsed_before + time.perf_counter() - start, last)
            if step % self.cfg.log_every == 0 or step == self.cfg.steps:
                now = time.perf_counter()
                span = max(now - window["t"], 1e-9)
                counted = ("samples", "tokens", "images", "padded", "packed")
                window.update(zip(counted, parallel.sum_over_ranks([window[k] for k in counted])))
                # Packed batches: the share of token slots that is padding, as packed and as one right-padded row a sample would have it.
                padding = {"pad_before": round(1 - window["tokens"] / window["padded"], 4), "pad_after": round(1 - window["tokens"] / window["packed"], 4)} if window["packed"] else {}
                if main:
                    self._log({
                        "stage": self.name, "step": step, "lr": lr, **last, "grad_norm": round(float(grad_norm), 4),
                        "samples_per_s": round(window["samples"] / span, 2), "tokens_per_s": round(window["tokens"] / span, 1),
                        "images_per_s": round(window["images"] / span, 2), **padding,
                        "elapsed_s": round(elapsed_before + now - start, 2), "skipped": stream.report()["skipped"],
                    })
                window = {"t": now, "tokens": 0, "images": 0, "samples": 0, "padded": 0, "packed": 0}
            if saves and self.cfg.ckpt_every and step % self.cfg.ckpt_every == 0:
                checkpoint = self._checkpoint(step, samples, elapsed_before + time.perf_counter() - start, stream)
        bar.close()
        elapsed = elapsed_before + time.perf_counter() - start
        if saves and step > 0:
            checkpoint = self._checkpoint(step, samples, elapsed, stream)
        report = stream.report()
        if report.get("skipped"):
            tqdm.write(f"[{self.name}] skipped {report['skipped']} bad samples: {report.get('errors', [])[:3]}")
        if report.get("left_out"):
            tqdm.write(f"[{self.name}] left out {report['left_out']} samples by its settings")
        return StageResult(step, samples, elapsed, last, checkpoint, report)
