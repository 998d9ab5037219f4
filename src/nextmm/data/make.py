"""Write Shapes World as WebDataset shards: one sub-directory per sample kind, so that the training
mix can weight kinds (see data/loader.py)."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from nextmm.data.shards import DataError, ShardWriter
from nextmm.worlds.shapes import generator as shapes


def write_shapes(out_dir: str | Path, counts: dict[str, int], seed: int = 0, shard_size: int = 2000, overwrite: bool = False) -> dict[str, int]:
    """counts: kind -> number of generator indices (a VQA index is one scene with several questions).
    Returns the number of samples written per kind."""
    unknown = sorted(set(counts) - set(shapes.KINDS))
    if unknown:
        raise DataError(f"unknown Shapes World kind(s) {unknown}; choose from {', '.join(shapes.KINDS)}")
    written = {}
    out = Path(out_dir)
    for kind, count in counts.items():
        if count <= 0:
            continue
        with ShardWriter(out / kind, prefix=kind, max_samples=shard_size, overwrite=overwrite) as writer:
            n = 0
            for sample in tqdm(shapes.make_samples(kind, seed, count), desc=f"shapes {kind}", total=count, unit="idx", leave=False):
                writer.write(sample)
                n += 1
        written[kind] = n
    return written
