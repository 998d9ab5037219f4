"""Building a model from local pretrained parts: the time and peak memory of `nextmm init` (read a Hugging
Face LLM and CLIP vision tower, build Emu around them, save it) and of `nextmm.load` on the result.

The parts are random models of real shapes, written by transformers in their real formats (the LLM in bf16,
as released checkpoints are): `small` (a 512-wide, 8-layer LLM and a ViT-S/16 tower) and `1b` (TinyLlama's
1.1B shape and a ViT-L/14 tower, with the emu-14b preset's 12-block causal transformer). Each measurement
runs in its own process, whose peak resident memory is what the JSON reports.

    python benchmarks/load_parts.py --shape small --work /tmp/parts
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "small": {
        "llm": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, vocab_size=32000),
        "vision": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6, image_size=224, patch_size=16),
        "set": ["resampler.width=256", "resampler.layers=2", "resampler.heads=4", "resampler.head_width=64"],
    },
    "1b": {
        "llm": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224, patch_size=14),
        "set": [],
    },
}
TEXTS = ["a large red circle above a small blue square", "what color is the triangle?", "the quick brown fox jumps over the lazy dog"] * 20


def write_parts(shape: dict, root: Path) -> tuple[Path, Path, int, int]:
    """A random LlamaForCausalLM with a small tokenizer.json (its unused rows are named by nextmm) and a
    random CLIPVisionModel, saved as their libraries save them."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    llm_dir, vision_dir = root / "llm", root / "vision"
    llm = LlamaForCausalLM(LlamaConfig(max_position_embeddings=2048, **shape["llm"])).to(torch.bfloat16)
    llm.save_pretrained(llm_dir)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"], show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(str(llm_dir / "tokenizer.json"))
    (llm_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tower = CLIPVisionModel(CLIPVisionConfig(**shape["vision"]))
    tower.save_pretrained(vision_dir)
    return llm_dir, vision_dir, sum(p.numel() for p in llm.parameters()), sum(p.numel() for p in tower.parameters())


def measured(code: str) -> dict:
    """Run `code` in a fresh Python; its wall time and its own peak resident memory."""
    start = time.perf_counter()
    reported = subprocess.run([sys.executable, "-c", code + "\nimport resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                              check=True, capture_output=True, text=True).stdout.split()
    seconds = time.perf_counter() - start
    return {"s": round(seconds, 2), "peak_gib": round(int(reported[-1]) / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--work", required=True, help="a folder for the parts and the model (several GB for 1b)")
    args = parser.parse_args()
    shape, root = SHAPES[args.shape], Path(args.work) / args.shape
    llm_dir, vision_dir, llm_params, vision_params = write_parts(shape, root)
    model_dir = root / "model"
    overrides = ", ".join(repr(s) for s in shape["set"])
    init = measured(f"from nextmm.convert.parts import init_model; init_model({str(llm_dir)!r}, {str(vision_dir)!r}, {str(model_dir)!r}, overrides=[{overrides}])")
    load = measured(f"import nextmm.api as a; m = a.load({str(model_dir)!r}, device='cpu')")
    size = sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file())
    print(json.dumps({
        "shape": args.shape, "llm_params_m": round(llm_params / 1e6, 1), "vision_params_m": round(vision_params / 1e6, 1),
        "init_s": init["s"], "init_peak_gib": init["peak_gib"], "load_s": load["s"], "load_peak_gib": load["peak_gib"],
        "model_dir_gib": round(size / 2**30, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
