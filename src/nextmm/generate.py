"""Batched text generation with a KV cache.

Prompts are left-padded to one length so each step appends one column for the whole batch; pad keys
are masked out and rotary positions count real tokens only, which makes a padded row compute exactly
what it would alone. Written by hand rather than with a library because the prompt mixes visual
embeddings into the token stream, which generic `generate()` helpers don't support.
"""

from __future__ import annotations

import torch

from nextmm.data.sample import Segment
from nextmm.data.sequence import SequenceBuilder
from nextmm.models.emu import Emu
from nextmm.models.llm import KVCache
from nextmm.precision import autocast, resolve


def _attention_mask(keys_valid: torch.Tensor, queries: int) -> torch.Tensor:
    """(B, K) valid keys -> (B, 1, queries, K) causal mask for the last `queries` positions. A padded
    query may see itself, so no row of the softmax is empty (its output is never used)."""
    total = keys_valid.shape[1]
    rows = torch.arange(total - queries, total).unsqueeze(1)
    causal = torch.arange(total).unsqueeze(0) <= rows
    mask = causal.unsqueeze(0) & keys_valid.unsqueeze(1)
    mask |= torch.arange(total).unsqueeze(0) == rows
    return mask.unsqueeze(1)


@torch.no_grad()
def generate_ids(
    model: Emu,
    builder: SequenceBuilder,
    prompts: list[list[Segment]],
    max_new_tokens: int = 32,
    use_cache: bool = True,
    precision: str = "fp32",
) -> list[list[int]]:
    """Greedy decoding; returns the new token ids of each prompt, up to (not including) [EOS]."""
    model.eval()
    encoded = [builder.encode(p, close=False) for p in prompts]
    batch = builder.collate(encoded, left_pad=True)
    ids, valid = batch["input_ids"], batch["valid"]
    b, prompt_len = ids.shape
    longest = int(valid.sum(1).max())
    max_new_tokens = min(max_new_tokens, builder.max_len - longest)
    precision = resolve(precision)
    bf16 = precision == "bf16"
    eos = builder.tok.eos_id

    with autocast(precision):
        visual = model.encode_images(batch["pixels"]) if batch["pixels"].numel() else None
        embeds = model.embed(ids, visual)
    keys_valid = torch.cat([valid, torch.zeros(b, max_new_tokens, dtype=torch.bool)], dim=1)
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    cache = KVCache(model.cfg.llm, b, prompt_len + max_new_tokens, torch.bfloat16 if bf16 else torch.float32) if use_cache else None

    generated = torch.zeros(b, 0, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool)
    step_embeds, step_positions = embeds, positions
    for i in range(max_new_tokens):
        total = prompt_len + i
        with autocast(precision):
            if use_cache:
                mask = _attention_mask(keys_valid[:, :total], step_embeds.shape[1])
                hidden = model.llm(step_embeds, step_positions, mask, cache)
            else:
                mask = _attention_mask(keys_valid[:, :total], total)
                hidden = model.llm(embeds, positions, mask)
            logits = model.llm.lm_head(hidden[:, -1]).float()
        token = logits.argmax(-1)
        token = torch.where(done, torch.full_like(token, eos), token)
        generated = torch.cat([generated, token.unsqueeze(1)], dim=1)
        done |= token == eos
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        keys_valid[:, total] = True
        next_pos = positions[:, -1:] + 1
        with autocast(precision):
            next_embed = model.llm.embed_tokens(token.unsqueeze(1))
        embeds = torch.cat([embeds, next_embed.to(embeds.dtype)], dim=1)
        positions = torch.cat([positions, next_pos], dim=1)
        step_embeds, step_positions = next_embed, next_pos
    out = []
    for row in generated.tolist():
        out.append(row[: row.index(eos)] if eos in row else row)
    return out


def generate_text(model: Emu, builder: SequenceBuilder, prompts: list[list[Segment]], **kwargs) -> list[str]:
    return [builder.tok.decode(ids) for ids in generate_ids(model, builder, prompts, **kwargs)]
