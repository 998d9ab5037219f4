import json

import pytest
import torch
import torch.nn.functional as F

from nextmm.api import build_model
from nextmm.config import ConfigError, make_config
from nextmm.data.loader import MixedStream, discover_sources
from nextmm.data.make import write_shapes
from nextmm.data.packing import LongerThanPack, Packer, first_fit_decreasing
from nextmm.data.sequence import Encoded, SequenceBuilder
from nextmm.models.emu import IGNORE
from nextmm.models.llm import document_layout
from nextmm.train.stages import pretrain_objective, pretrain_stage
from nextmm.worlds.shapes import generator as shapes

KINDS = ("caption", "itm", "story", "ground", "vqa", "binding", "video_qa")


def shaken(model):
    """The model with every weight moved at random, so that the heads' zero-initialised parts (what the presence
    probe and the agreement judge tell the LLM, the copy gate's proposal) carry what they read too, and the
    probe's and the judge's calibrations steepened, so that their losses tell one sample's reads from another's."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for name in ("presence.calibrate.weight", "agreement.judge.weight"):
            if name.split(".")[0] in model.heads:
                model.heads.get_parameter(name).fill_(30.0)
    return model.eval()


@pytest.fixture(params=["heads", "paper"])
def model(request, micro_config, tokenizer):
    if request.param == "paper":
        for switch in ("location", "pointer", "pointer_words", "pointer_roles", "copy", "presence", "agreement"):
            setattr(micro_config.heads, switch, False)
    else:
        micro_config.heads.words_to_visual = True
    torch.manual_seed(0)
    return shaken(build_model(micro_config, tokenizer))


@pytest.fixture()
def encoded(micro_config, tokenizer):
    """Samples with pictures, videos, boxes, regions and claims, of lengths from ~20 to ~80 tokens."""
    builder = SequenceBuilder.for_config(tokenizer, micro_config)
    samples = [s for kind in KINDS for s in shapes.make_samples(kind, 1, 2)][:16]
    return builder, [builder.encode(s.segments, named=s.named_box(), regions=s.regions(), claim=s.claim()) for s in samples]


def per_document(model, batch):
    """Each document's per-token cross-entropies and per-embedding squared errors, as Emu.loss computes them."""
    documents = batch.get("documents")
    ids, labels = batch["input_ids"], batch["labels"]
    visual, patches = model.see(batch["pixels"])
    positions, mask = document_layout(documents) if documents is not None else (None, None)
    reading = model.read(ids, visual, patches, documents=documents)
    hidden = model(ids, visual, positions, mask, reading=reading)
    picked = labels != IGNORE
    ce = F.cross_entropy(model.logits(hidden, reading, picked), labels[picked], reduction="none")
    at, slots = model.regression_rows(ids)
    predicted = model.heads.regress(reading, at, slots, model.regress(hidden[tuple(at.T)]))
    l2 = (predicted - visual.reshape(predicted.shape)).pow(2).mean(-1)
    which = documents if documents is not None else torch.zeros_like(ids)
    ce_of, l2_of = which[picked], which[tuple(at.T)]
    return [(ce[ce_of == d], l2[l2_of == d]) for d in range(int(which.max()) + 1)], hidden


def test_first_fit_decreasing_places_every_sample_once_within_capacity():
    lengths = [5, 3, 7, 2, 8, 1, 4]
    bins = first_fit_decreasing(lengths, 8)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 8 for b in bins)
    assert len(bins) == 4  # 30 tokens in rows of 8: the fewest possible
    assert all(b == sorted(b) for b in bins)


def test_a_packed_sample_computes_what_it_computes_alone(model, encoded):
    builder, samples = encoded
    packed = Packer(builder, 128).collate(samples)
    assert len(packed["input_ids"]) < len(samples)
    order = [samples[i] for b in first_fit_decreasing([len(e.ids) for e in samples], 128) for i in sorted(b)]
    with torch.no_grad():
        together, _ = per_document(model, packed)
        for sample, (ce, l2) in zip(order, together):
            (ce_alone, l2_alone), = per_document(model, builder.collate([sample]))[0]
            assert len(ce) == len(ce_alone) > 0 and len(l2) == len(l2_alone)
            torch.testing.assert_close(ce, ce_alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(l2, l2_alone, rtol=1e-5, atol=1e-5)


def test_stage1s_loss_of_a_packed_batch_is_that_of_the_padded_batch_heads_terms_included(model, encoded, micro_config):
    builder, samples = encoded
    loss_fn = pretrain_objective(model, micro_config.pretrain)[1]
    with torch.no_grad():
        a, b = loss_fn(Packer(builder, 128).collate(samples)), loss_fn(builder.collate(samples))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)


def test_no_position_reads_across_documents(model, encoded):
    builder, samples = encoded
    packed = Packer(builder, 128).collate(samples)
    row = int((packed["documents"].amax(1) - packed["documents"][:, 0]).argmax())  # the row holding most documents
    first = packed["documents"][row] == packed["documents"][row, 0]
    rest = (packed["documents"][row] >= 0) & ~first
    changed = dict(packed, input_ids=packed["input_ids"].clone())
    ids = changed["input_ids"][row]
    words = first & ~torch.isin(ids, torch.tensor([builder.tok.image_id, builder.tok.img_id, builder.tok.img_end_id]))
    ids[words] = (ids[words] + 7) % 300 + 10
    with torch.no_grad():
        before, after = per_document(model, packed)[1][row], per_document(model, changed)[1][row]
    assert not torch.allclose(before[first], after[first])
    torch.testing.assert_close(before[rest], after[rest], rtol=0, atol=0)


def test_rotary_positions_restart_and_attention_stays_within_each_document():
    documents = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    positions, mask = document_layout(documents)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    for lo, hi in ((0, 3), (3, 5), (5, 6), (6, 8)):  # the padding attends within itself: no query sees nothing
        expected[lo:hi, lo:hi] = torch.ones(hi - lo, hi - lo, dtype=torch.bool).tril()
    assert torch.equal(mask[0, 0], expected)


def test_the_padding_report_counts_slots_with_and_without_packing(encoded):
    builder, _ = encoded
    lengths = [5, 3, 7, 2]
    batch = Packer(builder, 8).collate([Encoded(ids=[builder.tok.eos_id] * n, targets=[True] * n) for n in lengths])
    assert batch["slots"].tolist() == [4 * 7, 3 * 8]  # right-padded to the longest; packed as [7], [5, 3], [2]
    assert int(batch["valid"].sum()) == sum(lengths)
    assert batch["documents"].tolist() == [[0] * 7 + [-1], [1] * 5 + [2] * 3, [3] * 2 + [-1] * 6]
    assert batch["input_ids"].shape == (3, 8)
    one_a_row = Packer(builder, 8).collate([Encoded(ids=[builder.tok.eos_id] * n, targets=[True] * n) for n in (5, 4)])
    assert one_a_row["input_ids"].shape == (2, 5) and one_a_row["slots"].tolist() == [10, 10]  # as wide as the fullest row


def test_under_data_parallel_each_rank_packs_its_own_disjoint_samples(tmp_path, encoded):
    builder, _ = encoded
    write_shapes(tmp_path, {"caption": 24, "vqa": 24}, seed=0, shard_size=12)
    packer = Packer(builder, 96)

    def documents_of(part):
        stream = MixedStream(discover_sources(tmp_path), {}, lambda s: builder.encode(s.segments), packer.collate, 8, seed=3, part=part)
        out = []
        for _ in range(3):
            batch = stream.next_batch()
            docs = batch["documents"]
            out.append(sorted(tuple(batch["input_ids"][docs == d].tolist()) for d in range(int(docs.max()) + 1)))
        return out

    whole, rank0, rank1 = documents_of((0, 1)), documents_of((0, 2)), documents_of((1, 2))
    for all_of, one, other in zip(whole, rank0, rank1):
        assert len(one) == len(other) == 4
        assert not set(one) & set(other)
        assert sorted(one + other) == all_of


def test_a_sample_longer_than_pack_len_is_refused_in_one_sentence_and_pack_len_must_fit_the_context(encoded):
    builder, samples = encoded
    first = len(samples[0].ids)
    with pytest.raises(LongerThanPack, match=f"a sample of {first} tokens does not fit .* pretrain.pack_len=16; raise pretrain.pack_len to {first}"):
        Packer(builder, 16).collate(samples)
    with pytest.raises(ConfigError, match="pretrain.pack_len' is 1000.*llm.max_seq_len=128"):
        make_config("micro", overrides=["pretrain.pack_len=1000"])


def test_stage1_trains_on_packed_batches(tmp_path, micro_config, tokenizer):
    write_shapes(tmp_path / "data", {"caption": 8}, seed=0, shard_size=8)
    p = micro_config.pretrain
    p.pack_len, p.batch_size, p.steps, p.time_budget_s, p.log_every, p.ckpt_every, p.warmup_steps, p.lr, p.precision = 96, 8, 12, 0, 1, 0, 2, 3e-3, "fp32"
    pretrain_stage(micro_config, discover_sources(tmp_path / "data"), tmp_path / "run", tokenizer, None, False, torch.device("cpu"))
    records = [json.loads(line) for line in (tmp_path / "run" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert len(records) == 12 and all(map(lambda v: v == v and abs(v) < 1e6, losses))
    assert sum(losses[-3:]) < sum(losses[:3])
    assert all(r["pad_after"] < r["pad_before"] for r in records)
    assert all(r["samples_per_s"] > 0 for r in records)
