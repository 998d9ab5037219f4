"""What each data source costs a trained model: stage 1's loss (CE and L2) on a few batches of every
source alone, the way stage 1 draws them (one source per batch). Tells which source makes the loss
spikes in stage 1's progress bar.

Usage: python research/source_loss.py --model runs/demo/model --data runs/demo/data [--batches 3]
Prints one JSON object: per source, the mean CE and L2 over its batches.
"""

import argparse
import json

import torch

import nextmm
from nextmm.data.loader import MixedStream, discover_sources
from nextmm.data.sequence import SequenceBuilder
from nextmm.heads.location import location_token_loss
from nextmm.train.stages import text_to_image_view


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--batches", type=int, default=3)
    args = parser.parse_args()
    m = nextmm.load(args.model)
    cfg, model = m.config, m.model.eval()
    sources = discover_sources(args.data)
    views = text_to_image_view(sources)
    builder = SequenceBuilder.for_config(m.tokenizer, cfg)
    result = {}
    for name in [*sources, *views]:
        stream = MixedStream(sources, {n: float(n == name) for n in [*sources, *views]}, lambda s: builder.encode(s.segments),
                             builder.collate, cfg.pretrain.batch_size, seed=0, views=views)
        text_loss = location_token_loss(model.heads.location_ids, cfg.pretrain.location_sigma)
        losses = [model.loss(b["input_ids"], b["labels"], b["pixels"], cfg.pretrain.regression_weight, text_loss)
                  for b in (stream.next_batch() for _ in range(args.batches))]
        result[name] = {key: round(sum(float(out[key]) for out in losses) / len(losses), 3) for key in ("ce", "l2") if key in losses[0]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
