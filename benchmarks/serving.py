"""Serving under load: `nextmm serve` on localhost with 1, 4 and 16 concurrent clients, its dynamic batching
(`--max-batch 16`) against one request at a time (`--max-batch 1`).

Each server runs in a process of its own (this script again, with --child), on 127.0.0.1 and a free port, both
alive for the whole run; the levels take turns between the two, so that a busy spell of a shared machine falls on
both. Each client sends streamed chat completions one after the other (a closed loop) until the level's requests
are all sent (max(16, 4 x clients)) or its time is up (--max-seconds); every request asks for --tokens tokens, and
the model's [EOS] and [IMG] scores are masked in the server, so that every reply writes exactly that many and the
two servers do the same work. A third of the prompts carry a Shapes World picture (a PNG data URL).

The model: --model DIR, or by default an untrained `tiny`-preset model (its tokenizer trained on Shapes World
captions) saved to a temporary folder; its replies are noise, and their speed is what is measured.

Per level: requests/s (completed requests over the level's wall time), p50 / p99 latency (request sent to
`data: [DONE]`), p50 / p99 time to the first token (the first chunk with text), completion tokens/s, errors
(anything but a whole 200 stream), and the largest batch the server decoded. Then the ratio of the two servers'
requests/s at the most clients (the target: >= 3x at 16).

    python benchmarks/serving.py                          # tiny untrained model, 32 tokens per reply
    python benchmarks/serving.py --model runs/demo/model --tokens 16 --clients 1 4 16

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import _common

PROMPTS = ["describe the picture.", "what shape is the red object?", "a large red circle above a small blue square",
           "how many circles are there, and what colors are they?", "tell me about the shapes.", "is there a purple square?"]
NAME = "bench"


def tiny_model(folder: Path) -> Path:
    """An untrained tiny-preset model saved in `folder`, its tokenizer trained on Shapes World captions."""
    import torch

    from nextmm.api import NextMM, build_model
    from nextmm.config import make_config
    from nextmm.data.sample import Text
    from nextmm.tokenizer import NextTokenizer
    from nextmm.worlds.shapes import generator as shapes

    cfg = make_config("tiny")
    texts = [seg.text for sample in shapes.make_samples("caption", 0, 500) for seg in sample.segments if isinstance(seg, Text)]
    tok = NextTokenizer.train(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.location_bins)
    torch.manual_seed(0)
    return NextMM(build_model(cfg, tok), tok, cfg).save(folder / NAME)


def child(args: argparse.Namespace) -> None:
    """The server: the model with its [EOS] and [IMG] masked, so that every reply is --tokens long."""
    import nextmm
    from nextmm.serve.app import Settings, serve
    from nextmm.serve.schema import Limits

    _common.set_threads(args.threads)
    m = nextmm.load(args.model, device="cpu")
    never, real = [m.tokenizer.eos_id, m.tokenizer.img_id], m.model.logits

    def endless(hidden, *rest):
        logits = real(hidden, *rest)
        logits[..., never] = float("-inf")
        return logits

    m.model.logits = endless
    serve(m, Settings(model_name=NAME, max_batch=args.max_batch, limits=Limits(max_tokens=max(512, args.tokens))), "127.0.0.1", 0, log_level="warning")


def start(args: argparse.Namespace, model: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, __file__, "--child", "--model", str(model), "--max-batch", str(max_batch), "--threads", str(args.threads),
               "--tokens", str(args.tokens)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()  # "nextmm: serving 'bench' at http://127.0.0.1:PORT/v1 ..."
    if " at http" not in line:
        process.kill()
        raise SystemExit(f"the server with --max-batch {max_batch} did not start: {line!r}")
    return process, line.split(" at ")[1].split("/v1")[0]


def picture_url() -> str:
    from nextmm.worlds.shapes import generator as shapes

    buffer = io.BytesIO()
    shapes.sample_scene(np.random.default_rng(0)).image().save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def one_request(client, url: str, body: dict) -> dict:
    """A streamed chat completion: its latency, time to the first token, completion tokens, or its error."""
    began = time.perf_counter()
    first, tokens = None, 0
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return {"error": f"HTTP {response.status_code}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return {"latency": time.perf_counter() - began, "ttft": first, "tokens": tokens}
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": chunk["error"]["message"]}
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - began
    except Exception as err:  # a failed connection counts as an error of the level, which goes on
        return {"error": f"{type(err).__name__}: {err}"}
    return {"error": "the stream ended without data: [DONE]"}


async def level(url: str, clients: int, requests: int, tokens: int, max_seconds: float, picture: str) -> dict:
    import httpx

    bodies = []
    for k in range(requests):
        text = {"type": "text", "text": PROMPTS[k % len(PROMPTS)]}
        content = [{"type": "image_url", "image_url": {"url": picture}}, text] if k % 3 == 0 else [text]
        bodies.append({"model": NAME, "messages": [{"role": "user", "content": content}], "max_tokens": tokens, "stream": True,
                       "stream_options": {"include_usage": True}})
    results, queue = [], list(reversed(bodies))
    began = time.perf_counter()
    ends = began + max_seconds

    async def client_loop(client) -> None:
        while queue and time.perf_counter() < ends:
            results.append(await one_request(client, url, queue.pop()))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=max_seconds, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    wall = time.perf_counter() - began
    done = [r for r in results if "error" not in r]
    latency = np.array([r["latency"] for r in done]) if done else np.zeros(1)
    ttft = np.array([r["ttft"] for r in done if r["ttft"] is not None]) if done else np.zeros(1)
    return {
        "clients": clients, "requests": len(done), "errors": len(results) - len(done),
        "error_examples": sorted({r["error"] for r in results if "error" in r})[:3],
        "requests_per_s": round(len(done) / wall, 3), "tokens_per_s": round(sum(r["tokens"] for r in done) / wall, 1),
        "latency_p50_s": round(float(np.percentile(latency, 50)), 4), "latency_p99_s": round(float(np.percentile(latency, 99)), 4),
        "ttft_p50_s": round(float(np.percentile(ttft, 50)), 4), "ttft_p99_s": round(float(np.percentile(ttft, 99)), 4),
        "wall_s": round(wall, 2), "complete_tokens": all(r["tokens"] == tokens for r in done),
    }


def health(url: str) -> dict:
    import httpx

    return httpx.get(f"{url}/health", timeout=30).json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model directory (default: an untrained tiny-preset model)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=32, help="completion tokens per request")
    parser.add_argument("--max-batch", type=int, default=16, help="the batched server's --max-batch")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="per level and server: no request is sent after this")
    parser.add_argument("--threads", type=int, default=1, help="each server's compute threads")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else tiny_model(Path(tmp))
        servers = {"batched": start(args, model, args.max_batch), "one_at_a_time": start(args, model, 1)}
        try:
            picture = picture_url()
            results: dict[str, list] = {name: [] for name in servers}
            for name, (_, url) in servers.items():  # warm-up: the first decode pays for lazy initialisation
                asyncio.run(level(url, 2, 2, args.tokens, args.max_seconds, picture))
            for clients in args.clients:
                for name, (_, url) in servers.items():
                    before = health(url)["largest_batch"]
                    row = asyncio.run(level(url, clients, max(16, 4 * clients), args.tokens, args.max_seconds, picture))
                    row["largest_batch_so_far"] = max(before, health(url)["largest_batch"])
                    results[name].append(row)
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(30)
    top = max(args.clients)
    rate = {name: next(r["requests_per_s"] for r in rows if r["clients"] == top) for name, rows in results.items()}
    print(json.dumps({
        "benchmark": "serving", "model": str(args.model or "untrained tiny preset"), "tokens_per_reply": args.tokens,
        "server_threads": args.threads, "batched_max_batch": args.max_batch, "results": results,
        f"batched_over_one_at_a_time_at_{top}_clients": round(rate["batched"] / rate["one_at_a_time"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
