"""The frozen tower's cache (train/tower_cache.py): the tower's own outputs, its forward run only on pictures not
kept, a bounded size, and stage 1 training exactly as without it."""

import json
import re

import pytest
import torch

from nextmm.config import ConfigError, make_config
from nextmm.data.make import write_shapes
from nextmm.models.vision import VisionTransformer
from nextmm.train.stages import train
from nextmm.train.tower_cache import TowerCache, tower_cache


@pytest.fixture
def tower():
    torch.manual_seed(0)
    cfg = make_config("micro").vision
    return VisionTransformer(cfg).requires_grad_(False), cfg.image_size


def test_the_cache_answers_with_the_towers_outputs_and_runs_it_only_on_new_pictures(tower):
    tower, size = tower
    seen = []
    pictures = torch.rand(5, 3, size, size)
    with tower_cache(tower, 1.0) as cache:
        plain = cache.run_tower
        cache.run_tower = lambda x: seen.append(len(x)) or plain(x)
        first = tower(pictures[:3])
        again = tower(pictures[[4, 1, 3, 0]])
    assert seen == [3, 2]  # pictures 4 and 3 are new the second time
    assert (cache.hits, cache.misses, len(cache.kept)) == (2, 5, 5)
    expected = tower(pictures)  # the plain forward again, outside the block
    assert "forward" not in vars(tower)
    torch.testing.assert_close(first, expected[:3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, expected[[4, 1, 3, 0]], rtol=1e-5, atol=1e-5)


def test_the_cache_keeps_to_its_budget_dropping_the_least_recently_used(tower):
    tower, size = tower
    pictures = torch.rand(4, 3, size, size)
    one = tower(pictures[:1])[0]
    cache = TowerCache(tower, 2 * one.numel() * one.element_size())
    cache(pictures[:2])
    cache(pictures[:1])  # picture 0 is now the most recently used
    cache(pictures[2:3])
    assert set(cache.kept) == {cache.digest(pictures[0]), cache.digest(pictures[2])}
    assert cache.bytes == 2 * one.numel() * one.element_size()


def test_a_tower_that_trains_is_not_cached(tower):
    tower, _ = tower
    tower.requires_grad_(True)
    with pytest.raises(ValueError, match="trains"):
        with tower_cache(tower, 1.0):
            pass


def test_the_cache_asks_for_a_frozen_tower_in_the_config():
    with pytest.raises(ConfigError, match="vision_lr_scale=0"):
        make_config("micro", overrides=["pretrain.tower_cache_gb=1"])
    with pytest.raises(ConfigError, match="tower_cache_gb"):
        make_config("micro", overrides=["pretrain.tower_cache_gb=-1", "pretrain.vision_lr_scale=0"])


def test_stage_one_trains_the_same_with_the_cache(tmp_path, capsys):
    data = tmp_path / "data"
    write_shapes(data, {"caption": 12, "vqa": 4}, seed=0, shard_size=20)  # 8 steps of 4 see every picture twice or more
    settings = ["clip.steps=0", "diffusion.steps=0", "pretrain.batch_size=4", "pretrain.steps=8", "pretrain.time_budget_s=0",
                "pretrain.log_every=1", "pretrain.precision=fp32", "pretrain.join_at={}", "pretrain.vision_lr_scale=0"]
    runs = {}
    for gib in (0, 1):
        out = tmp_path / f"run{gib}"
        train(make_config("micro", overrides=settings + [f"pretrain.tower_cache_gb={gib}"]), data, out)
        runs[gib] = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    said = re.search(r"(\d+) of (\d+) pictures \(\d+%\) came from the frozen tower's cache", capsys.readouterr().out)
    assert said and 0 < int(said[1]) < int(said[2])
    assert len(runs[0]) == len(runs[1]) == 8
    for plain, cached in zip(runs[0], runs[1]):
        assert cached["loss"] == pytest.approx(plain["loss"], rel=1e-4, abs=1e-5)
