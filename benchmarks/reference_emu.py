"""Stage-1 training speed of nextmm's Emu against a reference composed of `transformers` parts the way the
official Emu1 code composes them, at identical shapes, on the same Shapes World batches.

The reference: `CLIPVisionModel` (its last block's tokens, before the final norm) -> Emu's `ln_visual` -> a
`T5Stack` decoder fed N learned queries (`causal_tokens`) whose cross-attention keys and values read the
tower's width (Emu's `encoder_width`) -> `projection` to the LLM width -> `LlamaForCausalLM` over the token
embeddings with the `<image>` slots filled (`masked_scatter`, as LLaVA does) and a padding `attention_mask`;
loss = HF's causal-LM cross-entropy + lambda * MSE of a bias-free `stu_regress_head` (LLM width -> LLM width) at
`[IMG]` and each `<image>` but the last against the next visual embedding, detached; one backward of the sum.
nextmm: the same shapes (`_common.PAPER`: CLIP-layout tower, T5 causal transformer, regression in the LLM's
width, heads off) built by nextmm, its stage-1 objective (`pretrain_objective`, `pretrain_groups`,
`Emu.loss`; by default the L2 gradient stops at the visual stack, `train/regression.py`, in a second pass
over the graph) — and, as `nextmm_one_pass`, with `pretrain.regression_reaches_visual=true`, whose one
backward of CE + lambda * L2 is the reference's arithmetic exactly, and as `nextmm_compiled` that one with its
LLM blocks compiled (`pretrain.compile=true`, train/parallelize.py; asked for with --sides, and given a warm-up of
several steps, since each new sequence length compiles again until the blocks compile for any length).

Both sides run through nextmm's own `Trainer` (AdamW betas 0.9/0.95, clipping, the schedule) in the precision
`auto` picks on this CPU (bf16 autocast with native bf16, else fp32), on the same batches drawn beforehand
from the stage-1 `MixedStream` (right-padded to the longest in each batch, as HF collators pad), each in its
own process (peak RSS is its own). tokens/s counts non-pad tokens. A parity check first copies the
reference's weights into nextmm's model (through nextmm's converters) and compares the two losses on the
first batches in fp32: the compositions compute the same function.

    python benchmarks/reference_emu.py                                # small, 4 steps after 1 of warm-up
    python benchmarks/reference_emu.py --shape 1b --steps 2 --warmup 1 --batch-size 1   # ~1.5B parameters: ~25 GB of
                                                                  # weights, gradients and AdamW state, per side
    python benchmarks/reference_emu.py --shape 1b --set llm.layers=2 vision.layers=2 resampler.layers=2 --steps 1 --batch-size 1
    python benchmarks/reference_emu.py --set llm.layers=4             # any config override, applied to both sides

On a CPU that other busy processes share, give `--threads 1`: with more threads than free cores each op's
threads wait at its barrier for one another's time slice, which costs milliseconds per op and punishes the side
with more small ops, not the slower one. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import _common

SIDES = ("reference", "nextmm", "nextmm_one_pass", "nextmm_compiled")
ONE_PASS = {"nextmm_one_pass": ["pretrain.regression_reaches_visual=true"],
            "nextmm_compiled": ["pretrain.regression_reaches_visual=true", "pretrain.compile=true"]}
ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


class ReferenceEmu(nn.Module):
    """Emu1's composition from transformers' parts (the names are the official checkpoint's)."""

    def __init__(self, cfg, image_token_id: int, regression_weight: float):
        from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, T5Config
        from transformers.models.t5.modeling_t5 import T5Stack

        super().__init__()
        v, r, lm = cfg.vision, cfg.resampler, cfg.llm
        if cfg.emu.regress_in != "llm" or not cfg.emu.visual_norm or v.final_norm or v.kind != "clip":
            raise SystemExit("the reference is Emu1's composition: give a config in it (benchmarks/_common.PAPER)")
        self.image_token_id, self.regression_weight = image_token_id, regression_weight
        self.visual = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=v.width, intermediate_size=round(v.width * v.mlp_ratio), num_hidden_layers=v.layers, num_attention_heads=v.heads,
            image_size=v.image_size, patch_size=v.patch_size, hidden_act=ACTS[v.act], layer_norm_eps=v.eps))
        self.ln_visual = nn.LayerNorm(v.width, eps=1e-6)
        t5 = T5Config(vocab_size=8, d_model=r.width, d_kv=r.head_width or r.width // r.heads, num_heads=r.heads, d_ff=int(r.width * r.mlp_ratio),
                      num_layers=r.layers, relative_attention_num_buckets=r.relative_buckets, relative_attention_max_distance=r.relative_max_distance,
                      dropout_rate=0.0, feed_forward_proj="relu", is_decoder=True, use_cache=False, layer_norm_epsilon=1e-6)
        self.cformer = T5Stack(t5)
        self.cformer.embed_tokens = None  # the stack reads the learned queries as its input embeddings
        for block in self.cformer.block:  # Emu's encoder_width: cross-attention keys and values read the tower's width
            cross = block.layer[1].EncDecAttention
            cross.k, cross.v = (nn.Linear(v.width, cross.inner_dim, bias=False) for _ in range(2))
            for proj in (cross.k, cross.v):
                nn.init.normal_(proj.weight, std=v.width**-0.5)
        self.causal_tokens = nn.Parameter(torch.randn(1, r.num_queries, r.width) * 0.02)
        self.projection = nn.Linear(r.width, lm.width)
        self.lm = LlamaForCausalLM(LlamaConfig(
            vocab_size=lm.vocab_size, hidden_size=lm.width, intermediate_size=lm.ffn_hidden, num_hidden_layers=lm.layers,
            num_attention_heads=lm.heads, num_key_value_heads=lm.kv_heads or lm.heads, head_dim=lm.head_size, max_position_embeddings=lm.max_seq_len,
            rms_norm_eps=lm.norm_eps, tie_word_embeddings=lm.tie_embeddings, rope_parameters={"rope_type": "default", "rope_theta": lm.rope_theta}))
        self.stu_regress_head = nn.Linear(lm.width, lm.width, bias=False)

    def see(self, pixels: torch.Tensor) -> torch.Tensor:
        """(M, 3, H, W) -> (M, N, LLM width): Emu.forward's ln_visual(visual) -> cformer -> projection."""
        features = self.ln_visual(self.visual(pixel_values=pixels).last_hidden_state)
        queries = self.causal_tokens.expand(pixels.shape[0], -1, -1)
        return self.projection(self.cformer(inputs_embeds=queries, encoder_hidden_states=features, use_cache=False).last_hidden_state)

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids, labels = batch["input_ids"], batch["labels"]
        embeds = self.lm.get_input_embeddings()(ids)
        slots = ids == self.image_token_id
        if batch["pixels"].numel():
            visual = self.see(batch["pixels"])
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), visual.reshape(-1, embeds.shape[-1]).to(embeds.dtype))
        hidden = self.lm.model(inputs_embeds=embeds, attention_mask=batch["valid"].long()).last_hidden_state
        logits = self.lm.lm_head(hidden)
        # nextmm's labels[t] is the token after t; a Hugging Face causal LM's labels are the tokens, shifted inside.
        hf_labels = F.pad(labels[:, :-1], (1, 0), value=-100)
        texts = (labels != -100).any()
        ce = self.lm.loss_function(logits=logits, labels=hf_labels, vocab_size=logits.shape[-1]) if texts else logits.sum() * 0
        out = {"ce": ce, "loss": ce}
        if batch["pixels"].numel():
            before = slots[:, 1:]  # the hidden state before each <image> regresses its embedding
            predicted = self.stu_regress_head(hidden[:, :-1][before])
            l2 = F.mse_loss(predicted.float(), embeds[:, 1:][before].detach().float())
            out["l2"], out["loss"] = l2, ce + (self.regression_weight if texts else 1.0) * l2
        return out


def setup(args, side: str):
    """(config, tokenizer, batches) for one process: the same in each, drawn from the same stream."""
    cfg = _common.shape_config(args.shape, overrides=[*args.set, *ONE_PASS.get(side, [])])
    if args.batch_size:
        cfg.pretrain.batch_size = args.batch_size
    tok = _common.tokenizer_for(args.data, cfg, Path(args.data) / "tokenizer.json")
    cfg.llm.vocab_size = max(cfg.llm.vocab_size, tok.vocab_size)
    torch.manual_seed(args.seed)
    stream = _common.stage1_stream(cfg, tok, args.data)
    batches = [stream.next_batch() for _ in range(args.warmup + args.steps)]
    return cfg, tok, batches


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def nextmm_side(cfg, tok, batches, warmup: int) -> dict:
    from nextmm.train.stages import pretrain_groups, pretrain_objective

    torch.manual_seed(1)
    model = _common.build(cfg, tok)
    _, loss_fn, backward = pretrain_objective(model, cfg.pretrain)
    if cfg.pretrain.compile:
        from nextmm.train.parallelize import compile_blocks

        compile_blocks(model)
    result = _common.run_trainer(model, loss_fn, cfg, batches, warmup, groups=pretrain_groups(model, cfg.pretrain), backward=backward)
    return {"parameters": parameters(model), **result}


def reference_side(cfg, tok, batches, warmup: int) -> dict:
    from nextmm.train.loop import param_groups

    torch.manual_seed(1)
    model = ReferenceEmu(cfg, tok.image_id, cfg.pretrain.regression_weight)
    # The tower's post_layernorm (pooler only) never runs: counted apart, as nextmm's tower read before its norm has none.
    unused = parameters(model.visual.post_layernorm)
    groups = param_groups(model, cfg.pretrain.lr, cfg.pretrain.weight_decay)
    result = _common.run_trainer(model, model.loss, cfg, batches, warmup, groups=groups)
    return {"parameters": parameters(model) - unused, "parameters_unused": unused, "attention": model.lm.config._attn_implementation, **result}


def parity(cfg, tok, batches) -> dict:
    """The reference's weights copied into nextmm's model; both losses on the first batches, fp32, no grad."""
    from nextmm.convert.common import copy_into
    from nextmm.convert.emu1 import cformer_state
    from nextmm.convert.hf_llm import llm_state_from_hf
    from nextmm.convert.hf_vision import vision_state_from_hf
    from nextmm.train.stages import pretrain_objective

    torch.manual_seed(1)
    ref = ReferenceEmu(cfg, tok.image_id, cfg.pretrain.regression_weight).eval()
    ours = _common.build(cfg, tok).eval()
    copy_into(ours.vision, vision_state_from_hf(ref.visual.state_dict(), cfg.vision), "CLIPVisionModel")
    copy_into(ours.ln_visual, ref.ln_visual.state_dict(), "ln_visual")
    stack = {f"cformer.cformer.{k}": v for k, v in ref.cformer.state_dict().items()}
    copy_into(ours.resampler, cformer_state(stack | {"cformer.causal_tokens": ref.causal_tokens.data}), "T5Stack")
    copy_into(ours.visual_proj, ref.projection.state_dict(), "projection")
    copy_into(ours.llm, llm_state_from_hf(ref.lm.state_dict(), cfg.llm), "LlamaForCausalLM")
    copy_into(ours.regression_head, ref.stu_regress_head.state_dict(), "stu_regress_head")
    _, loss_fn, _ = pretrain_objective(ours, cfg.pretrain)
    rows, worst = [], 0.0
    with torch.no_grad():
        for batch in batches:
            a, b = ref.loss(batch), loss_fn(batch)
            row = {k: [round(float(a[k]), 6), round(float(b[k]), 6)] for k in ("loss", "ce", "l2") if k in a}
            worst = max([worst, *(abs(x - y) / max(abs(x), 1e-8) for x, y in row.values())])
            rows.append(row)
    return {"batches_reference_vs_nextmm": rows, "max_relative_difference": float(f"{worst:.2e}")}


def one(args) -> dict:
    side = args.one
    cfg, tok, batches = setup(args, side)
    if side == "parity":
        return parity(cfg, tok, batches[: args.parity_batches])
    run = reference_side if side == "reference" else nextmm_side
    return {**run(cfg, tok, batches, args.warmup), "peak_rss_mib": _common.peak_rss_mib(), "measured": _common.batch_counts(batches[args.warmup:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["tiny", "small", "1b"], default="small")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per side, after the warm-up")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=0, help="0: the preset's (32; 2 at 1b)")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES[:3]))
    parser.add_argument("--parity-batches", type=int, default=2, help="batches the parity check compares (0: none)")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides for both sides, e.g. llm.layers=4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="compute threads per process (0: PyTorch's default, one per core)")
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    threads = _common.set_threads(args.threads)
    if args.one:
        print(json.dumps(one(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        args.data = tmp
        _common.write_data(tmp)
        cfg = _common.shape_config(args.shape, overrides=args.set)
        _common.tokenizer_for(tmp, cfg, Path(tmp) / "tokenizer.json")
        flags = ["--shape", args.shape, "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
                 "--parity-batches", str(args.parity_batches), "--seed", str(args.seed), "--threads", str(args.threads), "--data", tmp, "--set", *args.set]

        def child(side: str) -> dict:
            out = subprocess.run([sys.executable, __file__, "--one", side, *flags], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"the {side} process failed:\n{out.stderr[-4000:]}")
            return json.loads(out.stdout.strip().splitlines()[-1])

        check = child("parity") if args.parity_batches else None
        results = {side: child(side) for side in args.sides}
    from nextmm.precision import resolve

    measured = [results[side].pop("measured") for side in results]
    if any(m != measured[0] for m in measured):
        raise SystemExit(f"the sides trained on different batches: {measured}")
    ratios = {f"{side}_vs_reference": round(results[side]["tokens_per_s"] / results["reference"]["tokens_per_s"], 3)
              for side in results if side != "reference" and "reference" in results}
    print(json.dumps({
        "benchmark": "reference_emu", "shape": args.shape, "batch_size": args.batch_size or cfg.pretrain.batch_size,
        "precision": resolve(cfg.pretrain.precision, "cpu"), "threads": threads, "transformers": __import__("transformers").__version__,
        "measured_batches": measured[0], "parity": check, "results": results, "tokens_per_s_ratio": ratios,
    }, indent=2))


if __name__ == "__main__":
    main()
