"""Chat: replies to conversations, streamed or not, one at a time or many in one batch, and their limits (on the
`chatty` model of conftest.py, whose replies change from token to token)."""

import numpy as np
import pytest
from PIL import Image as PILImage

from nextmm.api import NextMM
from nextmm.chat import ChatError, ContextFull, to_conversation
from nextmm.data.sample import Turn
from nextmm.worlds.shapes import generator as shapes


def picture(i: int) -> PILImage.Image:
    return shapes.sample_scene(np.random.default_rng([5, i])).image()


CONVERSATIONS = [
    [{"role": "user", "content": [picture(0), "describe the picture."]}],
    [{"role": "system", "content": "you answer briefly"}, {"role": "user", "content": "what shape is the red object?"}],
    [{"role": "user", "content": [picture(1), "describe the picture."]}, {"role": "assistant", "content": "a large red circle"},
     {"role": "user", "content": [[picture(2), picture(3)], "what happens in the video?"]}],
]


def test_a_conversation_is_emu_i_turns_ending_in_an_open_assistant_turn():
    segments = to_conversation(CONVERSATIONS[2])
    assert [s.role for s in segments if isinstance(s, Turn)] == ["user", "assistant", "user", "assistant"]
    assert isinstance(segments[-1], Turn)


def test_the_streamed_reply_is_the_reply_piece_by_piece(chatty):
    reply = chatty.chat(CONVERSATIONS[0], max_new_tokens=12)
    events = list(chatty.chat(CONVERSATIONS[0], max_new_tokens=12, stream=True))
    pieces = [e.text for e in events if e.kind == "text"]
    assert len(pieces) > 3 and len(set(pieces)) > 2  # it streams, and the reply is not one token repeated
    assert "".join(pieces).strip() == reply.text and events[-1].kind == "end" and events[-1].reply == reply
    assert reply.completion_tokens == 12 and reply.finish_reason == "length"
    assert reply.prompt_tokens == chatty.prompt_tokens(CONVERSATIONS[0])


def test_replies_decoded_together_are_each_what_it_is_alone(chatty):
    limits = [5, 9, 7]
    together = chatty.replies(CONVERSATIONS, max_new_tokens=limits)
    alone = [chatty.chat(c, max_new_tokens=n) for c, n in zip(CONVERSATIONS, limits)]
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.completion_tokens for r in together] == limits
    assert len({r.text for r in together}) == 3


def test_a_stopped_row_ends_at_once_and_the_others_go_on(chatty):
    stop: set[int] = set()
    ends, texts = {}, {0: "", 1: "", 2: ""}
    for event in chatty.replies(CONVERSATIONS, max_new_tokens=10, stream=True, stop=stop):
        if event.kind == "text":
            texts[event.row] += event.text
            if event.row == 1 and len(texts[1]) > 0:
                stop.add(1)  # the client of row 1 went away
        elif event.kind == "end":
            ends[event.row] = event.reply
    assert sorted(ends) == [0, 1, 2]
    assert ends[1].completion_tokens <= 2
    alone = [chatty.chat(CONVERSATIONS[i], max_new_tokens=10) for i in (0, 2)]
    assert [ends[0].text, ends[2].text] == [r.text for r in alone]


def test_a_reply_that_opens_a_picture_is_drawn(chatty, monkeypatch):
    img = chatty.tokenizer.img_id
    real = chatty.model.logits

    def drawing_logits(hidden, *rest):  # the untrained model rarely opens a picture: make it open one at once
        logits = real(hidden, *rest)
        logits[..., img] = logits.max() + 1
        return logits

    monkeypatch.setattr(chatty.model, "logits", drawing_logits)
    reply = chatty.chat([{"role": "user", "content": "draw a large red circle."}], stream=False)
    assert reply.finish_reason == "image" and len(reply.images) == 1 and reply.images[0].size == (64, 64)
    events = [e.kind for e in chatty.chat([{"role": "user", "content": "draw a large red circle."}], stream=True)]
    assert events == ["image", "end"]
    asks = [[{"role": "user", "content": f"draw {what}."}] for what in ("a large red circle", "a small blue square")]
    together = chatty.replies(asks)
    alone = [chatty.chat(ask) for ask in asks]
    # the same noise for each as alone: equal but for rounding (the batched regression's sums run in another order)
    gap = lambda a, b: np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max()  # noqa: E731
    assert all(gap(a.images[0], b.images[0]) <= 2 for a, b in zip(together, alone))
    assert gap(chatty.chat(asks[0], seed=1).images[0], alone[0].images[0]) > 20  # another noise, another picture
    chatty_without = NextMM(chatty.model, chatty.tokenizer, chatty.config)
    plain = chatty_without.chat([{"role": "user", "content": "draw a small blue square."}])
    assert plain.finish_reason == "image" and plain.images == []


def test_a_full_context_is_one_sentence_and_a_reply_gets_what_is_left(chatty):
    context = chatty.builder.max_len
    long = [{"role": "user", "content": "a " * (context + 5)}]
    with pytest.raises(ContextFull, match=rf"context is {context}.*start a new conversation"):
        chatty.chat(long)
    nearly = [{"role": "user", "content": "a " * (context - 10)}]
    left = context - chatty.prompt_tokens(nearly, 1)
    assert 0 < left < 10
    assert chatty.chat(nearly, max_new_tokens=50).completion_tokens <= left


@pytest.mark.parametrize("messages, message", [
    ([], "no messages"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "last message must be the user's"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], "may only come first"),
    ([{"role": "robot", "content": "hi"}], "role 'robot'"),
    ([{"role": "user", "content": 5}], "content is a int"),
    ([{"role": "user", "content": ["hi", 5]}], "holds a int"),
])
def test_bad_conversations_are_one_sentence(chatty, messages, message):
    with pytest.raises(ChatError, match=message):
        chatty.chat(messages)


def test_a_bad_token_limit_is_one_sentence(chatty):
    with pytest.raises(ChatError, match="max_new_tokens is 0"):
        chatty.chat(CONVERSATIONS[0], max_new_tokens=0)


def test_the_terminal_chat_streams_keeps_the_history_saves_drawings_and_says_when_the_context_is_full(tmp_path, chatty, monkeypatch):
    from nextmm.cli import video_frames
    from nextmm.console import Console

    picture(0).save(tmp_path / "scene.png")
    frames = tmp_path / "clip"
    frames.mkdir()
    for k in range(3):
        picture(k).save(frames / f"{k}.png")
    printed: list[str] = []
    seen: list[list[dict]] = []
    real_chat = chatty.chat
    monkeypatch.setattr(chatty, "chat", lambda conversation, *a, **kw: seen.append(conversation) or real_chat(conversation, *a, **kw))
    console = Console(chatty, tmp_path / "drawings", max_new_tokens=6, say=printed.append, video_frames=video_frames)
    console.run([f"/image {tmp_path / 'scene.png'}", "describe the picture.", f"/video {frames}", "what happens in the video?",
                 "/image nowhere.png", f"/video {tmp_path / 'no-clip'}", "a " * 200, "/reset", "hello", "/quit", "never read"])
    text = "".join(printed)
    assert f"error: video '{tmp_path / 'no-clip'}' is neither a folder of frames nor a frame file" in text
    assert text.count("assistant: ") == 3  # the two turns and the one after /reset; the over-long one is refused
    assert "the conversation is full" in text and "/reset" in text
    assert "error: " in text and "nowhere.png" in text  # a picture that is not there is one line, and the chat goes on
    first, second, after_reset = seen
    assert isinstance(first[0]["content"][0], PILImage.Image) and first[0]["content"][1] == "describe the picture."
    assert second[:2] == [first[0], {"role": "assistant", "content": second[1]["content"]}] and len(second) == 3
    assert isinstance(second[2]["content"][0], list) and len(second[2]["content"][0]) == 3  # the video's frames
    assert after_reset == [{"role": "user", "content": ["hello"]}]
    reply = real_chat(first, 6)
    assert reply.text in text  # what it streamed is the reply


def test_the_cli_chat_reads_lines_from_standard_input(tmp_path, capsys, monkeypatch, micro_nextmm):
    import io

    from nextmm.cli import main

    model = micro_nextmm.save(tmp_path / "model")
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/help\n"))
    assert main(["chat", "--model", str(model), "--max-new-tokens", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "assistant: " in out and "/image PATH" in out
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["chat", "--model", str(tmp_path / "missing")]) == 2


def test_the_terminal_chat_saves_what_the_model_draws(tmp_path, chatty, monkeypatch):
    from nextmm.console import Console

    img, real = chatty.tokenizer.img_id, chatty.model.logits

    def drawing_logits(hidden, *rest):
        logits = real(hidden, *rest)
        logits[..., img] = logits.max() + 1
        return logits

    monkeypatch.setattr(chatty.model, "logits", drawing_logits)
    printed: list[str] = []
    console = Console(chatty, tmp_path / "drawings", say=printed.append)
    console.run(["draw a large red circle.", "draw it again."])
    saved = sorted((tmp_path / "drawings").glob("*.png"))
    assert [p.name for p in saved] == ["drawing-000.png", "drawing-001.png"]
    assert str(saved[0]) in "".join(printed)
    assert isinstance(console.history[1]["content"][0], PILImage.Image)  # the model sees its own drawing in the next turn


def test_a_reply_that_writes_a_box_says_it_as_a_loc_span_that_reads_back_to_the_same_tokens(chatty):
    tok = chatty.tokenizer
    ids = tok.encode("the circle is here <loc>0.1000 0.2000 0.5000 0.7000</loc> and") + tok.bin_ids[:2]  # an unfinished box
    text = tok.decode_with_boxes(ids)
    assert text.startswith("the circle is here <loc>") and text.endswith("</loc> and")
    assert tok.encode(text) == ids[:-2]


def test_a_reply_near_the_end_of_the_context_is_batched_with_a_long_one(chatty):
    context = chatty.builder.max_len
    nearly = [{"role": "user", "content": "a " * (context - 12)}]
    left = context - chatty.prompt_tokens(nearly, 1)
    short, long = chatty.replies([nearly, CONVERSATIONS[1]], max_new_tokens=[50, left + 10])
    assert short.completion_tokens <= left and long.completion_tokens == left + 10
    assert long.text == chatty.chat(CONVERSATIONS[1], max_new_tokens=left + 10).text
