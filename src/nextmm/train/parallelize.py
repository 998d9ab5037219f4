"""Stage 1's model made ready to train, from outside the model code and in torchtitan's order: activation
checkpointing, then regional compile, then FSDP2 sharding, each per transformer block.

Checkpointing and compile replace a block's `forward` by a wrapper of it (an attribute of the block itself), so the
module tree and its state-dict names stay as they are, and `release` gives the plain blocks back for what follows
stage 1 (stage 2, generation, export). FSDP2 (`pretrain.sharding=fsdp` with several processes) shards every LLM block
on its own and everything else together, under a root that is the stage's loss (parallel.Objective), so the root's
parameters are gathered once a step and each block's only while it computes.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from nextmm.config import PretrainConfig
from nextmm.errors import UserError
from nextmm.models.emu import Emu
from nextmm.train import parallel


class CompileError(UserError):
    """torch.compile cannot build kernels here."""


def sharded(p: PretrainConfig) -> bool:
    """Whether stage 1 shards its model (FSDP2) in this run: one process has nothing to shard among."""
    return p.sharding == "fsdp" and parallel.world() > 1


def blocks(model: Emu) -> list[nn.Module]:
    """The transformer blocks that activation checkpointing covers: the LLM's and the vision tower's."""
    return [*model.llm.layers, *model.vision.blocks]


def checkpoint_blocks(model: Emu, every: int) -> None:
    """Every `every`-th block (0: none) keeps only its input in the forward pass and recomputes the rest in the
    backward pass (non-reentrant checkpointing, which composes with compile and FSDP)."""
    if every <= 0:
        return
    for i, block in enumerate(blocks(model)):
        if i % every == 0:
            inner = block.forward
            block.forward = lambda *args, inner=inner, **kwargs: checkpoint(inner, *args, use_reentrant=False, **kwargs)


def check_compiler(device: torch.device) -> None:
    """One tiny compiled function, run once, so that a machine without a working compiler says so in one sentence
    before training rather than in a traceback at its first step."""
    try:
        torch.compile(lambda x: torch.nn.functional.gelu(x) * 2)(torch.ones(8, device=device))
    except Exception as err:  # inductor's failures come as many types (a missing compiler, a failed build, ...)
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise CompileError(f"torch.compile cannot build kernels on this machine ({first[:200]}); train without --compile (pretrain.compile=false)") from err


def compile_blocks(model: Emu) -> None:
    """Each LLM block's forward compiled on its own (regional compile): the blocks are alike, so the compiled code
    serves all of them, and the compile takes a block's time rather than the whole model's."""
    check_compiler(next(model.parameters()).device)
    for block in model.llm.layers:
        block.forward = torch.compile(block.forward)


def shard(model: Emu, loss_fn: Callable[[dict], dict], precision: str) -> parallel.Objective:
    """The model's parameters sharded among the ranks in place (FSDP2), and the loss as the sharded root that runs
    it. Each LLM block is a unit of its own; the rest (embeddings, LM head, the vision tower, the causal transformer,
    the heads) is the root's. The tower stays whole with the root because a rank whose part of a batch holds no
    picture skips it, and per-block units of it would then wait for gathers the other ranks never make. With bf16
    the gathered parameters are bf16 and gradients are reduced in fp32."""
    mesh = init_device_mesh(next(model.parameters()).device.type, (parallel.world(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else MixedPrecisionPolicy()
    for block in model.llm.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # FSDP cannot shard a 0-dim parameter (a head's learned temperature): those stay whole in every rank, and the
    # Trainer averages their gradients itself (parallel.reduce_unsharded).
    scalars = [p for p in model.parameters() if p.ndim == 0]
    root = fully_shard(parallel.Objective(model, loss_fn, unsharded=scalars), mesh=mesh, mp_policy=policy, ignored_params=set(scalars))
    # A batch need not reach every parameter (a text-to-image batch computes no word logits, a head waits for its
    # kind of data), and one rank's may reach what another's does not: the unreached ones count as zero gradients,
    # so that every rank reduces the same tensors.
    root.set_reduce_scatter_unused_params(True)
    kept = [buffer for name, buffer in model.named_buffers() if name in model.state_dict()]

    def share_buffers(*_) -> None:
        """As under DDP, the persistent buffers (a running statistic such as the copy head's mean picture) are rank
        0's at every forward, so that they stay one model's."""
        for buffer in kept:
            dist.broadcast(buffer, 0)

    root.register_forward_pre_hook(share_buffers)
    return root


def prepare(model: Emu, loss_fn: Callable[[dict], dict], p: PretrainConfig, precision: str) -> parallel.Objective | None:
    """Checkpointing, compile and sharding as `p` asks, in that order; the sharded root when sharded (the optimizer
    is then built on the sharded parameters), else None."""
    checkpoint_blocks(model, p.activation_checkpointing)
    if p.compile:
        compile_blocks(model)
    return shard(model, loss_fn, precision) if sharded(p) else None


def release(model: Emu, build: Callable[[], Emu]) -> Emu:
    """The model as stage 1 leaves it for the rest of the run: its blocks plain again; when sharded, a whole copy
    (from `build`) on every rank, gathered from the ranks' shards, since stage 2 reads the whole model on each."""
    if parallel.is_sharded(model):
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        whole = build()
        whole.load_state_dict(full)
        return whole.to(next(model.parameters()).device)
    for block in blocks(model):
        block.__dict__.pop("forward", None)
    return model
