"""What every state-dict adapter needs: read a foreign checkpoint from a local path (safetensors first,
sharded or not; pickles only through `torch.load(weights_only=True)`), unwrap DeepSpeed's `module`, and
copy a mapped state dict into a module with every missing, unexpected or misshapen key named in one
sentence. No adapter downloads anything: a path is a local file or directory, or it is an error.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors.torch import load_file
from torch import nn

from nextmm.errors import UserError

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.bin")
LISTED = 6  # how many keys an error names before it says how many more


class ConvertError(UserError):
    """A foreign checkpoint that nextmm cannot read or map: named, with what to do."""


def shortened(keys: Iterable[str], limit: int = LISTED) -> str:
    """'a, b, c and 12 more': a key list short enough for one sentence."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} and {len(keys) - limit} more"


def mismatch(missing: Iterable[str], unexpected: Iterable[str]) -> str:
    """'missing a, b; unexpected c': what a state dict lacks and holds too much of, for one sentence."""
    parts = [f"missing {shortened(missing)}" if missing else "", f"unexpected {shortened(unexpected)}" if unexpected else ""]
    return "; ".join(p for p in parts if p)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConvertError(f"'{path}' does not exist; give a directory that holds it")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConvertError(f"'{path}' is not valid JSON ({err.__class__.__name__}); restore it from the model's source") from err


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConvertError(
            f"'{path}' holds objects other than tensors, which nextmm does not unpickle (torch.load weights_only); "
            "save its state_dict() alone, or as safetensors"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ConvertError(f"'{path}' is not a readable PyTorch checkpoint ({err.__class__.__name__}); check the file") from err


def read_file(path: Path) -> dict[str, torch.Tensor]:
    """One checkpoint file: `.safetensors`, else a PyTorch pickle read with weights_only."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own SafetensorError, or OSError
            raise ConvertError(f"'{path}' is not a readable safetensors file ({err.__class__.__name__}); check the file") from err
    return _read_pickle(path)


def unwrap(state: Mapping) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint saved as {"module": ...} (DeepSpeed) or {"state_dict": ...} (Lightning and
    others), else the checkpoint itself; anything but tensors left at the top is an error."""
    for wrapper in ("module", "state_dict", "model"):
        if wrapper in state and isinstance(state[wrapper], Mapping) and len(state) <= 4:
            state = state[wrapper]
            break
    odd = [k for k, v in state.items() if not torch.is_tensor(v)]
    if odd:
        raise ConvertError(f"the checkpoint holds entries that are not tensors ({shortened(odd)}); give the model's state dict")
    return dict(state)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a local checkpoint: a file, or a directory holding `model.safetensors`, sharded
    safetensors with their index, or (failing those) a PyTorch pickle."""
    path = Path(path)
    if path.is_file():
        return unwrap(read_file(path))
    if not path.is_dir():
        raise ConvertError(f"'{path}' does not exist; give a local checkpoint file or directory (nothing is downloaded)")
    for index_name in (SAFETENSORS_INDEX, PICKLE_INDEX):
        if (path / index_name).is_file():
            shards = sorted(set(read_json(path / index_name).get("weight_map", {}).values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing or not shards:
                raise ConvertError(f"'{path / index_name}' lists shards that are not there ({shortened(missing) or 'none listed'}); copy every shard")
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(unwrap(read_file(path / shard)))
            return state
    for name in SINGLE_FILES:
        if (path / name).is_file():
            return unwrap(read_file(path / name))
    raise ConvertError(f"'{path}' holds no checkpoint ({', '.join(SINGLE_FILES)} or a sharded index); give the model's directory")


def copy_into(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a state dict already mapped to `module`'s names, after checking that the keys and shapes agree
    exactly; `source` names the checkpoint in the error."""
    own = module.state_dict()
    missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
    if missing or unexpected:
        raise ConvertError(f"'{source}' does not fit the model: {mismatch(missing, unexpected)}; check that its config matches its weights")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ConvertError(
                f"'{source}': tensor '{key}' has shape {tuple(value.shape)} where the model expects {tuple(own[key].shape)}; "
                "check that its config matches its weights"
            )
    with torch.no_grad():  # in place, one tensor at a time: a converted copy of the whole checkpoint would double the peak
        for key, value in state.items():
            own[key].copy_(value)
