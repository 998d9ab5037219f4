"""Batched generation with a KV cache: words by greedy decoding, images by regressing N visual embeddings.

Prompts are left-padded to one length so each step appends one column for the whole batch; pad keys
are masked out and rotary positions count real tokens only, which makes a padded row compute exactly
what it would alone. Written by hand rather than with a library because the prompt mixes visual
embeddings into the token stream and image generation feeds each regressed embedding back as the next
input, which generic `generate()` helpers don't support.
"""

from __future__ import annotations

import contextlib
from typing import Container, Iterator, Sequence

import torch

from nextmm.constrained import Constraint
from nextmm.data.sample import Segment
from nextmm.data.sequence import SequenceBuilder, SequenceTooLong
from nextmm.device import device_of, to_device
from nextmm.heads.base import summed
from nextmm.models.emu import Emu
from nextmm.models.llm import KVCache
from nextmm.precision import autocast, resolve


def _attention_mask(keys_valid: torch.Tensor, queries: int) -> torch.Tensor:
    """(B, K) valid keys -> (B, 1, queries, K) causal mask for the last `queries` positions. A padded
    query may see itself, so no row of the softmax is empty (its output is never used)."""
    total = keys_valid.shape[1]
    steps = torch.arange(total, device=keys_valid.device)
    rows = steps[total - queries :].unsqueeze(1)
    causal = steps.unsqueeze(0) <= rows
    mask = causal.unsqueeze(0) & keys_valid.unsqueeze(1)
    mask |= steps.unsqueeze(0) == rows
    return mask.unsqueeze(1)


class Stepper:
    """The LLM over a left-padded batch, one appended position at a time: with a KV cache each step runs
    the new column only; without one it re-runs the whole sequence (the reference the cache must match).
    Each extra head keeps its own state (heads/base.py, Decoding) and adds what it adds through it."""

    def __init__(self, model: Emu, batch: dict[str, torch.Tensor], new_positions: int, use_cache: bool, precision: str):
        self.model, self.use_cache = model, use_cache
        self.device = device_of(model)
        self.precision = precision = resolve(precision, self.device.type)  # 'auto' -> what this device computes fastest
        batch = to_device(batch, self.device)
        ids, valid = batch["input_ids"], batch["valid"]
        b, self.prompt_len = ids.shape
        with autocast(precision, self.device.type):
            visual, patches = model.see(batch["pixels"])
            self.embeds = model.embed(ids, visual)
        reading = model.read(ids, visual, patches, valid)
        added = model.heads.input(reading)
        if added is not None:
            self.embeds = self.embeds + added.to(self.embeds.dtype)
        self.states = model.heads.decoding(reading)
        self.last_token = ids[:, -1]
        self.keys_valid = torch.cat([valid, torch.zeros(b, new_positions, dtype=torch.bool, device=self.device)], dim=1)
        self.positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.cache = KVCache(model.cfg.llm, b, self.prompt_len + new_positions, dtype, self.device) if use_cache else None
        self.appended = 0

    def _run(self, step_embeds: torch.Tensor, step_positions: torch.Tensor) -> torch.Tensor:
        """The hidden states of the new positions (B, new, width); the whole sequence's without a cache."""
        total = self.prompt_len + self.appended
        with autocast(self.precision, self.device.type):
            if self.use_cache:
                mask = _attention_mask(self.keys_valid[:, :total], step_embeds.shape[1])
                hidden = self.model.llm(step_embeds, step_positions, mask, self.cache)
            else:
                mask = _attention_mask(self.keys_valid[:, :total], total)
                hidden = self.model.llm(self.embeds, self.positions, mask)
            top = summed([state.top(hidden.shape[1]) for state in self.states])  # as Emu.forward adds the heads' tops
            if top is not None:
                hidden = hidden + top.to(hidden.dtype)
            for state in self.states:
                state.seen(hidden)
        return hidden

    def casting(self) -> contextlib.AbstractContextManager:
        """One autocast region around a whole decode: autocast keeps the bf16 copies of the weights it makes until its
        outermost region ends, so they are made once rather than at every step."""
        return autocast(self.precision, self.device.type)

    def _uncast(self) -> contextlib.AbstractContextManager:
        """What runs between the LLM's steps (scores, regressions, the next input) in the weights' own precision, as
        outside `casting`."""
        return torch.autocast(self.device.type, enabled=False)

    def prefill(self) -> torch.Tensor:
        """The last prompt position's hidden state (B, width)."""
        return self._run(self.embeds, self.positions)[:, -1]

    def append(self, next_embeds: torch.Tensor) -> torch.Tensor:
        """Append one input embedding per row (B, width) that no token gave (a regressed picture's); returns
        the hidden state it produces."""
        for state in self.states:
            state.embedding()
        return self._append(next_embeds)

    def _append(self, next_embeds: torch.Tensor) -> torch.Tensor:
        self.keys_valid[:, self.prompt_len + self.appended] = True
        self.appended += 1
        # A row that has ended keeps taking the batch's steps, unread: its positions stop at the context's last.
        next_pos = (self.positions[:, -1:] + 1).clamp(max=self.model.cfg.llm.max_seq_len - 1)
        next_embeds = next_embeds.unsqueeze(1).to(self.embeds.dtype)
        self.embeds = torch.cat([self.embeds, next_embeds], dim=1)
        self.positions = torch.cat([self.positions, next_pos], dim=1)
        return self._run(next_embeds, next_pos)[:, -1]

    def append_token(self, token: torch.Tensor) -> torch.Tensor:
        """Append one token per row (B,), with what the heads add to its input embedding; as `append`."""
        with self._uncast():
            embeds = self.model.llm.embed_tokens(token)
            added = summed([state.token(self.last_token, token) for state in self.states])
        if added is not None:
            embeds = embeds + added.to(embeds.dtype)
        self.last_token = token
        return self._append(embeds)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The next token's logits (or, with a copy head, log-probabilities) at the last position's hidden state (B, width)."""
        with self._uncast():
            hidden = hidden.to(self.model.llm.lm_head.weight.dtype)
            logits = self.model.logits(hidden)
            for state in self.states:
                logits = state.logits(hidden, logits)
        return logits

    def regress(self, hidden: torch.Tensor, slot: int) -> torch.Tensor:
        """The `slot`-th visual embedding of the picture being drawn, regressed at the hidden state (B, width)."""
        with self._uncast():
            predicted = self.model.regress(hidden)
            for state in self.states:
                predicted = state.regress(slot, predicted)
        return predicted


def generate_ids(
    model: Emu,
    builder: SequenceBuilder,
    prompts: list[list[Segment]],
    max_new_tokens: int = 32,
    use_cache: bool = True,
    precision: str = "fp32",
    answers: Constraint | None = None,
) -> list[list[int]]:
    """Greedy decoding; returns the new token ids of each prompt, up to (not including) [EOS], or up to
    and including `[IMG]` when the model decides to draw (the caller regresses the image). With `answers`
    every row writes an answer the constraint allows (constrained.py), however long it is."""
    rows: list[list[int]] = [[] for _ in prompts]
    for step in stream_ids(model, builder, prompts, max_new_tokens, use_cache, precision, answers):
        for row, token in step:
            rows[row].append(token)
    eos = builder.tok.eos_id
    return [row[: row.index(eos)] if eos in row else row for row in rows]


@torch.no_grad()
def stream_ids(
    model: Emu,
    builder: SequenceBuilder,
    prompts: list[list[Segment]],
    max_new_tokens: int | Sequence[int] = 32,
    use_cache: bool = True,
    precision: str = "fp32",
    answers: Constraint | None = None,
    stop: Container[int] = (),
) -> Iterator[list[tuple[int, int]]]:
    """Greedy decoding of a batch, step by step: each step yields (row, token) for every row still writing. A row
    ends with the token that ends it ([EOS], or `[IMG]` when it decides to draw), after its own number of new tokens
    (`max_new_tokens`, one for all or one per prompt, cut to what the context leaves it), or at once when `stop` holds
    it (a caller that may add rows to it while this runs: a client that went away)."""
    model.eval()
    batch = builder.collate([builder.encode(p, close=False) for p in prompts], left_pad=True)
    lengths = batch["valid"].sum(1).tolist()
    if answers is not None:
        longest = max(lengths)
        if longest + answers.depth > builder.max_len:
            raise SequenceTooLong(
                f"a prompt of {longest} tokens leaves no room in the model's context of {builder.max_len} "
                f"for the longest allowed answer ({answers.depth} tokens); shorten the prompt or the answers"
            )
        max_new_tokens = answers.depth
    wanted = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    limits = [min(n, builder.max_len - length) for n, length in zip(wanted, lengths)]
    steps = max(limits)
    if steps <= 0:
        return
    eos = builder.tok.eos_id
    stepper = Stepper(model, batch, steps, use_cache, precision)
    generated = torch.zeros(len(prompts), 0, dtype=torch.long, device=stepper.device)
    done = torch.tensor([n <= 0 for n in limits], device=stepper.device)
    with stepper.casting():
        hidden = stepper.prefill()
        for i in range(steps):
            for row in list(stop):
                if 0 <= row < len(prompts):
                    done[row] = True
            if bool(done.all()):
                break
            logits = stepper.logits(hidden)
            if answers is not None:
                logits = answers.restrict(logits, generated)
            token = logits.argmax(-1)
            token = torch.where(done, torch.full_like(token, eos), token)
            generated = torch.cat([generated, token.unsqueeze(1)], dim=1)
            writing = (~done).nonzero().flatten().tolist()
            done |= (token == eos) | (token == builder.tok.img_id)
            for row in writing:
                if i + 1 >= limits[row]:
                    done[row] = True
            yield [(row, t) for row, t in zip(writing, token[writing].tolist())]
            if bool(done.all()) or i == steps - 1:
                break
            hidden = stepper.append_token(token)


@torch.no_grad()
def next_token_logits(model: Emu, builder: SequenceBuilder, prompts: list[list[Segment]], precision: str = "fp32",
                      then: Sequence[int] = ()) -> torch.Tensor:
    """(prompts, vocabulary): the scores greedy decoding would compare for each prompt's next token (log-
    probabilities with a copy head, else logits), once the tokens `then` have followed every prompt."""
    model.eval()
    batch = builder.collate([builder.encode(p, close=False) for p in prompts], left_pad=True)
    stepper = Stepper(model, batch, 1 + len(then), True, precision)
    with stepper.casting():
        hidden = stepper.prefill()
        for token in then:
            hidden = stepper.append_token(torch.full((len(prompts),), token, dtype=torch.long, device=stepper.device))
        return stepper.logits(hidden)


def generate_text(model: Emu, builder: SequenceBuilder, prompts: list[list[Segment]], **kwargs) -> list[str]:
    """Text only: a continuation that opens an image ends there ([IMG] is special, so it decodes to nothing)."""
    return [builder.tok.decode(ids) for ids in generate_ids(model, builder, prompts, **kwargs)]


@torch.no_grad()
def generate_visual(
    model: Emu,
    builder: SequenceBuilder,
    prompts: list[list[Segment]],
    use_cache: bool = True,
    precision: str = "fp32",
) -> torch.Tensor:
    """Emu's image generation: append `[IMG]` to each prompt, then regress the N visual embeddings one
    at a time, each fed back (through the same projection as an encoded image's) as the next input.
    Returns (B, N, cfg.visual_width) in fp32."""
    model.eval()
    encoded = []
    for prompt in prompts:
        e = builder.encode(prompt, close=False)
        e.add([builder.tok.img_id])
        if len(e.ids) + model.num_queries > builder.max_len:
            raise SequenceTooLong(
                f"the prompt is {len(e.ids)} tokens and its image needs {model.num_queries} more, but the model's "
                f"context is {builder.max_len}; use fewer images or shorter text"
            )
        encoded.append(e)
    batch = builder.collate(encoded, left_pad=True)
    stepper = Stepper(model, batch, model.num_queries - 1, use_cache, precision)
    regressed = []
    with stepper.casting():
        hidden = stepper.prefill()
        for k in range(model.num_queries):
            embedding = stepper.regress(hidden, k)
            regressed.append(embedding)
            if k < model.num_queries - 1:
                hidden = stepper.append(model.to_llm(embedding))  # the projection under autocast, as an encoded image's
    return torch.stack(regressed, dim=1)
