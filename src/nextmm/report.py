"""A one-file HTML report: headline figures, loss curves (inline SVG) and sample images with the
model's captions and answers (inline PNG), so it opens anywhere with nothing beside it."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image


def _png(image: Image.Image, scale: int = 2) -> str:
    buf = io.BytesIO()
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(buf, format="PNG")
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_svg(records: list[dict[str, Any]], keys: tuple[str, ...], title: str, width: int = 420, height: int = 200) -> str:
    series = {k: [(r["step"], r[k]) for r in records if k in r] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return f"<p>{html.escape(title)}: no metrics recorded.</p>"
    points = [p for v in series.values() for p in v]
    x_max = max(x for x, _ in points) or 1
    y_max = max(y for _, y in points) or 1.0
    pad = 30
    colours = ["#c0392b", "#2471a3", "#229954", "#b7950b"]
    lines = []
    for colour, (name, values) in zip(colours, series.items()):
        coords = " ".join(
            f"{pad + x / x_max * (width - 2 * pad):.1f},{height - pad - y / y_max * (height - 2 * pad):.1f}" for x, y in values
        )
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>')
        lines.append(f'<text x="{width - pad - 60}" y="{pad + 14 * len(lines) // 2}" fill="{colour}" font-size="11">{name}</text>')
    axes = (
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#666"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#666"/>'
        f'<text x="{pad}" y="{pad - 8}" font-size="11">{html.escape(title)} (max {y_max:.3g})</text>'
        f'<text x="{width - pad - 40}" y="{height - 8}" font-size="11">step {x_max}</text>'
    )
    return f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">{axes}{"".join(lines)}</svg>'


def _row(cells: list[str]) -> str:
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _mark(truth: str, prediction: str) -> str:
    ok = truth.strip() == prediction.strip()
    return f'<span class="{"ok" if ok else "bad"}">{html.escape(prediction)}</span>'


def write_report(path: Path, metrics: dict[str, Any], examples: dict[str, list[dict]], run_dir: Path) -> Path:
    headline = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    figures = "".join(_row([html.escape(k), html.escape(str(v))]) for k, v in headline.items())
    per_template = "".join(
        _row([html.escape(group), html.escape(k), str(v)])
        for group in ("vqa_per_template", "video_qa_per_template") for k, v in metrics.get(group, {}).items()
    )
    curves = "".join(loss_svg(read_metrics(run_dir / stage / "metrics.jsonl"), keys, title) for stage, keys, title in (
        ("clip", ("loss",), "stage 0: CLIP loss"),
        ("pretrain", ("ce", "l2"), "stage 1: text CE and visual L2"),
        ("autoencoder", ("recon",), "stage 2: autoencoder reconstruction"),
        ("diffusion", ("loss", "mse"), "stage 2: denoising loss (Min-SNR weighted, and plain)"),
    ) if (run_dir / stage).is_dir())
    drawings = "".join(
        f'<div class="cell">{_png(image)}<br>{html.escape(prompt)}</div>' for prompt, image in examples.get("drawings", [])
    )
    captions = "".join(
        _row([_png(e["image"]), html.escape(e["truth"]), _mark(e["truth"], e["prediction"])]) for e in examples.get("captions", [])
    )
    vqa = "".join(
        _row([_png(e["image"]), html.escape(e["question"]), html.escape(e["truth"]), _mark(e["truth"], e["prediction"])])
        for e in examples.get("vqa", [])
    )
    video = "".join(
        _row(["".join(_png(f, 1) for f in e["frames"]), html.escape(e["question"]), html.escape(e["truth"]), _mark(e["truth"], e["prediction"])])
        for e in examples.get("video", [])
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>nextmm demo report</title>
<style>body{{font-family:sans-serif;margin:2em}} td{{padding:4px 10px;vertical-align:middle}}
table{{border-collapse:collapse}} tr:nth-child(even){{background:#f4f4f4}} .ok{{color:#1e8449}} .bad{{color:#c0392b;font-weight:bold}}
.grid{{display:flex;flex-wrap:wrap;gap:12px}} .cell{{width:150px;font-size:12px}}</style>
</head><body><h1>nextmm on Shapes World</h1>
<h2>Figures (held-out seed {metrics.get("seed")})</h2><table>{figures}</table>
<h2>Per question template</h2><table>{per_template}</table>
<h2>Training curves</h2>{curves}
<h2>Captions</h2><table><tr><th>image</th><th>truth</th><th>model</th></tr>{captions}</table>
<h2>Questions</h2><table><tr><th>image</th><th>question</th><th>truth</th><th>model</th></tr>{vqa}</table>
<h2>Videos</h2><table><tr><th>frames</th><th>question</th><th>truth</th><th>model</th></tr>{video}</table>
<h2>Drawings</h2><div class="grid">{drawings or "<p>This model has no visual decoder.</p>"}</div>
</body></html>"""
    path.write_text(page)
    return path
