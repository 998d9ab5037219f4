"""Checkpoints of a sharded model (FSDP2), written with torch.distributed.checkpoint (DCP): every rank writes and
reads its own shards and none gathers the whole model, and such a checkpoint resumes on any number of processes,
sharded or not, since DCP reads whatever part of each tensor a rank holds. The modules and the optimizer go in as
state dicts keyed by parameter names (torch.distributed.checkpoint.state_dict), never by positions or ranks.

train/checkpoint.py decides which kind a checkpoint is and writes the rest of it (state, RNG) around these files.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)

from nextmm.train import parallel

DIR = "shards"  # the checkpoint's subdirectory of DCP files
WHOLE = StateDictOptions(full_state_dict=True)


def _state(modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {**{name: get_model_state_dict(m) for name, m in modules.items()}, "optimizer": get_optimizer_state_dict(modules["model"], optimizer)}


def _read(state: dict[str, Any], path: Path, together: bool) -> None:
    """DCP's load in place; `together`: the ranks read their parts of sharded tensors together, else each process
    reads all of every tensor alone (DCP then warns that it assumes one process, which is meant)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=not together)


def save(path: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> None:
    """Every rank's shards of the modules and the optimizer into `path` (a collective: every rank calls it)."""
    dcp.save(_state(modules, optimizer), checkpoint_id=path)


def difference(ours: dict[str, torch.Tensor], theirs: dict[str, tuple[int, ...]]) -> str | None:
    """The first way a checkpoint's tensors (name: shape) do not fit a module's state dict, else None."""
    for name, tensor in ours.items():
        if name not in theirs:
            return f"it has no {name}"
        if tuple(theirs[name]) != tuple(tensor.shape):
            return f"its {name} is {list(theirs[name])}, this model's {list(tensor.shape)}"
    extra = sorted(theirs.keys() - ours.keys())
    return f"it holds {extra[0]}, which this model lacks" if extra else None


def _saved(path: Path, name: str) -> dict[str, tuple[int, ...]]:
    """The shapes of the tensors saved under `name` (a module) at `path`."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    prefix = f"{name}."
    return {key[len(prefix):]: tuple(meta.size) for key, meta in metadata.items() if key.startswith(prefix) and hasattr(meta, "size")}


def load(path: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> str | None:
    """The modules and the optimizer from `path`, whole or sharded; the first difference instead (nothing loaded)
    when the checkpoint is another model's."""
    state = _state(modules, optimizer)
    for name in modules:
        if (differs := difference(state[name], _saved(path, name))) is not None:
            return differs
    _read(state, path, together=parallel.is_sharded(modules["model"]))
    for name, module in modules.items():
        set_model_state_dict(module, state[name])
    set_optimizer_state_dict(modules["model"], optimizer, state["optimizer"])
    return None


def load_module(module: nn.Module, path: Path, name: str = "model") -> str | None:
    """One whole module's weights from `path`; the first difference instead when they are another model's."""
    state = {name: module.state_dict()}
    if (differs := difference(state[name], _saved(path, name))) is not None:
        return differs
    _read(state, path, together=False)
    module.load_state_dict(state[name])
    return None


def load_whole(modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, tensors: dict[str, dict[str, torch.Tensor]],
               optimizer_state: dict[str, Any]) -> str | None:
    """A one-file checkpoint's whole tensors (per module) and optimizer state (torch's, keyed by position) into
    sharded modules, each rank keeping its part; the first difference instead when they are another model's."""
    for name, module in modules.items():
        if (differs := difference(module.state_dict(), {k: tuple(v.shape) for k, v in tensors[name].items()})) is not None:
            return differs
    for name, module in modules.items():
        set_model_state_dict(module, tensors[name], options=WHOLE)
    model = modules["model"]
    names = {id(p): n for n, p in model.named_parameters()}
    # torch numbers the parameters in the order of the optimizer's groups, which follow the model's names
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {
        "state": {order[i]: entry for i, entry in optimizer_state["state"].items()},
        "param_groups": [{**group, "params": [order[i] for i in group["params"]]} for group in optimizer_state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=WHOLE)
    return None
