"""Training checkpoints and exported model directories, written atomically, with no pickles.

A checkpoint is a directory `checkpoints/step-NNNNNNN/` holding one `{name}.safetensors` per module,
`optimizer.safetensors` + `optimizer.json` (AdamW's tensors and its plain-number settings), and
`state.json` (step, data position, RNG). A sharded model's (FSDP2) holds `shards/` instead of the modules' and the
optimizer's files, every rank's part of them (train/shards.py). Either kind resumes a run of either kind. It is
written under a temporary name and renamed when complete, then `checkpoints/latest` is replaced; a run killed
mid-write resumes from the previous one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from nextmm.errors import UserError
from nextmm.train import parallel, shards


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def save_module(module: nn.Module, path: Path) -> None:
    save_file(own_storage(_contiguous(module.state_dict())), str(path))


def own_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors, each name on a storage of its own: safetensors refuses tied or shared weights, so a name
    whose storage an earlier name holds gets a copy (cloning them all would hold the model twice in memory)."""
    seen, out = set(), {}
    for name, tensor in tensors.items():
        storage = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    return out


class CheckpointMismatch(UserError):
    """A checkpoint whose weights do not fit the model the current config builds."""


def load_module(module: nn.Module, path: Path, strict: bool = True) -> None:
    module.load_state_dict(load_file(str(path)), strict=strict)


def mismatch(path: Path, first: str) -> CheckpointMismatch:
    return CheckpointMismatch(
        f"checkpoint '{path}' was trained with another config ({first}); resume with the settings it was "
        "trained with, or train into a fresh --out"
    )


def resume_module(module: nn.Module, path: Path) -> None:
    """`load_module` for a run being resumed, whose config may not be the one it was trained with."""
    try:
        load_module(module, path)
    except RuntimeError as err:  # torch lists every mismatch; the first says which setting differs
        raise mismatch(path, next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))) from err


def resume_weights(module: nn.Module, checkpoint: Path, name: str = "model") -> None:
    """`resume_module` for the module `name` of a checkpoint of either kind, into a whole module."""
    if (checkpoint / shards.DIR).is_dir():
        if (differs := shards.load_module(module, checkpoint / shards.DIR, name)) is not None:
            raise mismatch(checkpoint, differs)
    else:
        resume_module(module, checkpoint / f"{name}.safetensors")


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors, plain = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, entry in sd["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value
            else:
                plain["state"].setdefault(str(idx), {})[name] = value
    return _contiguous(tensors), plain


def optimizer_from_files(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, entry in plain["state"].items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": plain["param_groups"]}


def write_atomically(final: Path, fill: Callable[[Path], None], every_rank: Callable[[Path], None] | None = None,
                     keep: tuple[str, ...] = ()) -> Path:
    """Build a directory under a temporary name beside `final`, then rename it into place. With `every_rank`
    (called by every rank: a sharded model's checkpoint), each rank first writes its part into the one temporary
    directory, then rank 0 alone fills in the rest and renames it. `keep`: entries of an existing `final` that
    the new directory takes over (a tuned model's tune/ run folder), moved in once the rest is written."""
    tmp = final.with_name(f".tmp-{final.name}-{'ranks' if every_rank is not None else os.getpid()}")
    if every_rank is None or parallel.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if every_rank is not None:
        parallel.barrier()  # the others write once rank 0 has made the directory afresh
        every_rank(tmp)
        if not parallel.is_main():
            return final
    fill(tmp)
    for name in keep:
        if (final / name).exists():
            os.replace(final / name, tmp / name)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def write_file_atomically(final: Path, fill: Callable[[Path], None]) -> Path:
    """Write one file under a temporary name beside `final`, then rename it into place; a failed write
    leaves nothing behind."""
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    try:
        fill(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def save_checkpoint(
    root: Path,
    step: int,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Called by rank 0 alone, or by every rank when the model is sharded."""
    sharded = parallel.is_sharded(modules["model"])
    root.mkdir(parents=True, exist_ok=True)

    def fill(tmp: Path) -> None:
        if not sharded:
            for name, module in modules.items():
                save_module(module, tmp / f"{name}.safetensors")
            tensors, plain = optimizer_to_files(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(plain))
        save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state))

    every_rank = (lambda tmp: shards.save(tmp / shards.DIR, modules, optimizer)) if sharded else None
    path = write_atomically(root / f"step-{step:07d}", fill, every_rank)
    if not parallel.is_main():
        return path
    pointer = root / ".latest.tmp"
    pointer.write_text(path.name)
    os.replace(pointer, root / "latest")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A checkpoint of either kind into whole or sharded modules (every rank calls it)."""
    if (path / shards.DIR).is_dir():
        differs = shards.load(path / shards.DIR, modules, optimizer)
    else:
        plain = json.loads((path / "optimizer.json").read_text())
        optimizer_state = optimizer_from_files(load_file(str(path / "optimizer.safetensors")), plain)
        if parallel.is_sharded(modules["model"]):
            tensors = {name: load_file(str(path / f"{name}.safetensors")) for name in modules}
            differs = shards.load_whole(modules, optimizer, tensors, optimizer_state)
        else:
            for name, module in modules.items():
                resume_module(module, path / f"{name}.safetensors")
            optimizer.load_state_dict(optimizer_state)
            differs = None
    if differs is not None:
        raise mismatch(path, differs)
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch"])
    return json.loads((path / "state.json").read_text())


def mark_stage_done(stage_dir: Path, result: Any, **extra: Any) -> None:
    """Record a finished stage (a StageResult, plus anything its resume needs back) in done.json."""
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(result).items()}
    (stage_dir / "done.json").write_text(json.dumps({**record, **extra}, indent=2))


def _done_record(stage_dir: Path, resume: bool) -> dict[str, Any] | None:
    """The stage's done.json record when resuming a stage that finished, else None."""
    done = stage_dir / "done.json"
    return json.loads(done.read_text()) if resume and done.is_file() else None


def _allows_more(record: dict[str, Any], limits: Any) -> bool:
    """Whether `limits` (the stage's TrainConfig) allow more steps and more time than the stage stopped at."""
    more_time = limits.time_budget_s <= 0 or record["elapsed_s"] < limits.time_budget_s
    return record["step"] < limits.steps and more_time


def stage_trains(stage_dir: Path, resume: bool, limits: Any) -> bool:
    """Whether the stage in `stage_dir` trains in this run rather than being loaded: it never finished, or
    its limits now allow more than it stopped at, so it continues from its last checkpoint (extending a
    finished run: raise its steps or time_budget_s and resume)."""
    record = _done_record(stage_dir, resume)
    return record is None or _allows_more(record, limits)


def set_aside(stage_dir: Path, reason: str) -> None:
    """Move an earlier run of a stage that must start afresh to `<stage>.old`, where nothing resumes it by
    mistake (an older `<stage>.old` is replaced)."""
    if not stage_dir.exists():
        return
    old = stage_dir.with_name(stage_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    stage_dir.rename(old)
    tqdm.write(f"[{stage_dir.name}] starts afresh, since {reason}; its earlier run is in {old}")


def finished_stage(module: nn.Module, stage_dir: Path, resume: bool, limits: Any) -> dict[str, Any] | None:
    """When resuming and the stage in `stage_dir` finished: load its final weights into `module` and
    return its done.json record. None means the stage must (still) run (`stage_trains`)."""
    record = _done_record(stage_dir, resume)
    if record is None:
        return None
    if _allows_more(record, limits):
        tqdm.write(
            f"[{stage_dir.name}] finished at step {record['step']} after {record['elapsed_s']:.0f}s; continuing to "
            f"steps={limits.steps}, time_budget_s={limits.time_budget_s:g}"
        )
        return None
    resume_weights(module, latest_checkpoint(stage_dir / "checkpoints"))
    tqdm.write(f"[{stage_dir.name}] already finished in {stage_dir}; loaded it")
    return record

