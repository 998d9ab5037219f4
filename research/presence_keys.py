"""What a presence probe can read whether a picture holds a phrase from: a fresh probe (models/emu.py's
PresenceProbe: a query from the phrase's decayed word bag, a log-sum-exp of its scores, a calibration) is
trained on a finished model's frozen features, on caption batches' region phrases against every picture
of the batch (Emu.presence_loss's pairs), and scored as research/presence_probe.py scores a model's own
probe. Keys from: `pointer`, the location pointer's patch keys (as trained); `patches`, the patch grid
through the probe's own key layer; `visual`, the N visual embeddings through it (what llm.presence reads).

Usage: python research/presence_keys.py --model runs/demo/model --data runs/demo/data [--steps 300]
Prints one JSON object per key source.
"""

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from presence_probe import auc, phrases

import nextmm
from nextmm.data.loader import MixedStream, discover_sources
from nextmm.data.sample import Image
from nextmm.heads.presence import PresenceProbe
from nextmm.heads.words import Words
from nextmm.worlds.shapes.generator import object_regions


def bags_of(model, ids: torch.Tensor) -> torch.Tensor:
    """(R, L) phrases padded with -1 -> (R, width) their decayed mean word embeddings, as PresenceProbe.presence_loss."""
    return Words.mean(model.heads.words(model.llm.embed_tokens).phrase_bags_of(ids))


def features(model, pixels: torch.Tensor, source: str) -> torch.Tensor:
    with torch.no_grad():
        visual, patches = model.see(pixels)
        if source == "visual":
            return visual
        return model.heads.location.pointer.key(patches) if source == "pointer" else patches


def trial(m, data: str, source: str, steps: int, lr: float) -> dict:
    torch.manual_seed(0)
    model, builder = m.model, m.builder
    model.eval()
    widths = {"visual": m.config.resampler.width, "patches": m.config.vision.width, "pointer": model.heads.location.pointer.key.out_features}
    probe = PresenceProbe(m.config.llm.width, widths[source])
    if source == "pointer":  # the pointer's keys as they are
        probe.key = torch.nn.Identity()
    caption = discover_sources(data)["caption"]
    stream = MixedStream({"caption": caption}, {"caption": 1.0}, lambda s: builder.encode(s.segments, regions=object_regions(s)), builder.collate, 32, 0)
    trained = [p for n, p in probe.named_parameters() if n != "found"]
    optimizer = torch.optim.Adam(trained, lr=lr)
    for _ in range(steps):
        batch = stream.next_batch()
        keys = features(model, batch["pixels"], source)
        ids, image = batch["region_ids"], batch["region_image"]
        pictures = image.unique()
        inside = ((ids[:, None] == ids[None]).all(-1).float() @ (image[:, None] == pictures[None]).float()) > 0
        bags = bags_of(model, ids)
        logits = probe.logits(bags, keys[pictures])
        losses = F.binary_cross_entropy_with_logits(logits, inside.float(), reduction="none")
        loss = (losses[inside].mean() + losses[~inside].mean()) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    asked = phrases(300, seed=77)
    scores = []
    with torch.no_grad():
        for start in range(0, len(asked), 100):
            part = asked[start:start + 100]
            batch = builder.collate([builder.encode([Image(p)], close=False) for p, _, _ in part])
            ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(m.tokenizer.encode(t)) for _, t, _ in part], batch_first=True, padding_value=-1)
            scores.append(torch.sigmoid(probe.logits(bags_of(model, ids), features(model, batch["pixels"], source), torch.arange(len(part)))))
    p, kinds = torch.cat(scores).numpy(), np.array([k for _, _, k in asked])
    report = {"keys": source, "steps": steps, "lr": lr}
    for kind in ("changed", "swapped"):
        keep = (kinds == "present") | (kinds == kind)
        report[f"auc_present_vs_{kind}"] = round(auc(p[keep], kinds[keep] == "present"), 4)
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="the run's data folder (its caption shards)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.015, help="stage 1's rate x pretrain.presence_lr_scale")
    args = parser.parse_args()
    m = nextmm.load(args.model)
    for source in ("pointer", "patches", "visual"):
        print(json.dumps(trial(m, args.data, source, args.steps, args.lr)))


if __name__ == "__main__":
    main()
