from nextmm.tokenizer import NextTokenizer


def test_words_round_trip_and_specials_are_single_ids(tokenizer):
    text = "a large red circle to the left of a small blue square"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    for token in ("[IMG]", "[/IMG]", "<image>", "[USER]", "[ASSISTANT]", "[PAD]", "[BOS]", "[EOS]", "<bin_0>", "<bin_63>"):
        assert len(tokenizer.tok.encode(token, add_special_tokens=False).ids) == 1
    assert tokenizer.location_bins == 64


def test_a_word_has_the_same_ids_wherever_it_stands(tokenizer):
    # Sequences are built segment by segment; both spellings must agree.
    assert tokenizer.encode("red") == tokenizer.encode(" red")


def test_location_tokens_follow_ofa(tokenizer):
    ids = tokenizer.location_ids([0, 16, 32, 64], 64)
    names = [tokenizer.tok.id_to_token(i) for i in ids]
    assert names == ["<bin_0>", "<bin_16>", "<bin_32>", "<bin_63>"]


def test_save_and_load(tmp_path, tokenizer):
    tokenizer.save(tmp_path / "tokenizer.json")
    again = NextTokenizer.load(tmp_path / "tokenizer.json")
    assert again.encode("what color is the circle?") == tokenizer.encode("what color is the circle?")
    assert (again.image_id, again.eos_id, again.location_bins) == (tokenizer.image_id, tokenizer.eos_id, 64)


def test_loc_spans_become_four_location_tokens_and_back(tokenizer):
    import pytest

    from nextmm.tokenizer import loc_text

    box = (10, 5, 40, 35)
    text = f"what does the region {loc_text(box, 64)} show?"
    ids = tokenizer.encode(text)
    bins = [round(v / 64 * 63) for v in box]
    loc_ids = tokenizer.location_ids(box, 64)
    assert [tokenizer.tok.id_to_token(i) for i in loc_ids] == [f"<bin_{b}>" for b in bins]
    start = len(tokenizer.encode("what does the region"))
    assert ids[:start] == tokenizer.encode("what does the region")
    assert ids[start:start + 4] == loc_ids and ids[start + 4:] == tokenizer.encode("show?")
    decoded = tokenizer.box_from_ids(ids, 64)
    assert all(abs(a - b) <= 64 / 63 for a, b in zip(decoded, box))
    assert tokenizer.box_from_ids(tokenizer.encode("no box here"), 64) is None
    with pytest.raises(ValueError, match="four fractions"):
        tokenizer.encode("<loc>0.1 0.2 1.5 0.3</loc>")


def test_detection_output_reads_as_phrases_with_boxes(tokenizer):
    from nextmm.tokenizer import loc_text

    text = f"a large red circle {loc_text((0, 0, 32, 32), 64)}, a small blue square {loc_text((40, 40, 52, 52), 64)}, a green"
    found = tokenizer.phrases_with_boxes(tokenizer.encode(text), 64)
    assert [p for p, _ in found] == ["a large red circle", "a small blue square"]  # the last has no box
    assert all(abs(a - b) <= 64 / 63 for a, b in zip(found[1][1], (40, 40, 52, 52)))
