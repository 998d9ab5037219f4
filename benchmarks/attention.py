"""SDPA vs the matmul-softmax path on CPU, forward + backward, at nextmm's attention shapes.
Prints JSON: milliseconds per call for each path and shape. Usage: python benchmarks/attention.py"""

import json
import time

import torch
import torch.nn.functional as F

from nextmm.models.attention import attend

SHAPES = {  # (batch, heads, tokens, head_dim), causal
    "tiny vision, 256 images": ((256, 4, 65, 32), False),
    "tiny llm, video batch": ((32, 4, 95, 64), True),
    "tiny llm, caption batch": ((32, 4, 26, 64), True),
}


def time_ms(fn, q, k, v, causal, reps=5):
    for _ in range(2):
        fn(q, k, v, causal).float().sum().backward()
    start = time.perf_counter()
    for _ in range(reps):
        fn(q, k, v, causal).float().sum().backward()
    return round((time.perf_counter() - start) / reps * 1000, 2)


def main():
    torch.manual_seed(0)
    results = {}
    for name, (shape, causal) in SHAPES.items():
        q, k, v = [torch.randn(*shape, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
        sdpa = time_ms(lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, is_causal=c), q, k, v, causal)
        ours = time_ms(lambda q, k, v, c: attend(q, k, v, causal=c), q, k, v, causal)
        results[name] = {"sdpa_ms": sdpa, "attend_ms": ours, "speedup": round(sdpa / ours, 2)}
    print(json.dumps({"benchmark": "attention_fwd_bwd_bf16_cpu", "threads": torch.get_num_threads(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
