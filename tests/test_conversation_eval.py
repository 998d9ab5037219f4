"""Held-out instruction following on Shapes World conversations (worlds/shapes/conversations.py): each turn asked with
the reference history before it, scored per turn type; first against a model stand-in whose answers are known, then
on an untrained model through the real chat API."""

from dataclasses import dataclass, field

import numpy as np

from nextmm.chat import ContextFull
from nextmm.data.sample import Image, Video
from nextmm.tokenizer import loc_text
from nextmm.worlds.shapes import generator as S
from nextmm.worlds.shapes.conversations import evaluate_conversations, reply_box, turn_prompts

SEED, N = 31, 24


@dataclass
class FakeReply:
    text: str = ""
    images: list = field(default_factory=list)
    finish_reason: str = "stop"


def first_picture(messages) -> bytes:
    visual = next(part for part in messages[0]["content"] if not isinstance(part, str))
    return np.asarray(visual[0] if isinstance(visual, list) else visual).tobytes()


class Oracle:
    """A stand-in for the model that knows every held-out answer: right on every turn but those of the types in
    `wrong`, and out of context for prompts of more than `longest` messages."""

    def __init__(self, wrong=(), longest=99, draws=True):
        self.wrong, self.longest, self.draws = set(wrong), longest, draws
        self.truth = {}
        for sample in S.make_samples("conversation", SEED, N):
            visual = next(seg for seg in sample.segments if isinstance(seg, (Image, Video)))
            key = np.asarray(visual.image if isinstance(visual, Image) else visual.frames[0]).tobytes()
            for k, turn in enumerate(sample.meta["turns"]):
                self.truth[(key, 2 * k + 1)] = (sample, turn)
        self.asked = []

    def prompt_tokens(self, messages, max_new_tokens=64):
        if len(messages) > self.longest:
            raise ContextFull("no room")
        return 1

    def replies(self, conversations, max_new_tokens=64, **draw_options):
        self.asked += conversations
        return [self.reply(c) for c in conversations]

    def reply(self, messages) -> FakeReply:
        _, turn = self.truth[(first_picture(messages), len(messages))]
        right = turn["type"] not in self.wrong
        if turn["type"] == "draw":
            objects = [S.Obj.from_dict(o) for o in turn["objects"]]
            if not right:  # every object recoloured: the shapes are there, in colours not asked for
                objects = [S.Obj(o.shape, "gray" if o.colour == "cyan" else "cyan", o.size, o.box) for o in objects]
            return FakeReply(images=[S.render(objects)] if self.draws else [], finish_reason="image")
        if turn["type"] == "ground":
            x0, y0, x1, y1 = turn["box"]
            shift = 2 if right else 20  # IoU above 0.5 for every box side (10..30 px), then below it
            return FakeReply(f"here: {loc_text((x0 + shift, y0, x1 + shift, y1), S.CANVAS)}")
        return FakeReply(turn["answer"] if right else turn["answer"] + " maybe")


def all_turns():
    return [turn for s in S.make_samples("conversation", SEED, N) for turn in s.meta["turns"]]


def test_an_oracle_scores_one_on_every_turn_type_each_asked_with_the_reference_history():
    oracle = Oracle()
    result = evaluate_conversations(oracle, N, seed=SEED)
    types = {"caption", "vqa", "ground", "draw", "video_caption", "video_qa"}
    assert set(result["turns"]) == types and all(v == 1.0 for v in result["turns"].values()) and result["overall"] == 1.0
    assert sum(result["counts"].values()) == len(all_turns()) == len(oracle.asked) and result["too_long"] == 0
    assert result["draw_opened"] == 1.0 and {e["type"] for e in result["examples"]} == types
    # teacher forcing: before turn k come the k reference answers, pictures included, and the picture opens turn 1
    for messages in oracle.asked:
        sample, turn = oracle.truth[(first_picture(messages), len(messages))]
        k = len(messages) // 2
        assert messages[-1] == {"role": "user", "content": ([messages[0]["content"][0]] if k == 0 else []) + [turn["question"]]}
        for j, before in enumerate(sample.meta["turns"][:k]):
            said = messages[2 * j + 1]
            assert said["role"] == "assistant" and messages[2 * j]["content"][-1] == before["question"]
            if before["type"] == "draw":
                (picture,) = said["content"]
                assert np.array_equal(np.asarray(picture), np.asarray(S.render([S.Obj.from_dict(o) for o in before["objects"]])))
            else:
                assert said["content"] == [before["answer"]]


def test_each_turn_type_is_scored_on_its_own_and_overall_counts_every_turn():
    result = evaluate_conversations(Oracle(wrong={"vqa", "ground", "draw"}), N, seed=SEED)
    assert result["turns"] == {"caption": 1.0, "vqa": 0.0, "ground": 0.0, "draw": 0.0, "video_caption": 1.0, "video_qa": 1.0}
    counts = result["counts"]
    assert result["overall"] == round((counts["caption"] + counts["video_caption"] + counts["video_qa"]) / sum(counts.values()), 4)


def test_a_draw_without_a_picture_is_wrong_and_prompts_past_the_context_are_left_out():
    result = evaluate_conversations(Oracle(longest=3, draws=False), N, seed=SEED)
    turns = all_turns()
    assert result["too_long"] == sum(1 for s in S.make_samples("conversation", SEED, N) for k in range(len(s.meta["turns"])) if 2 * k + 1 > 3)
    assert sum(result["counts"].values()) + result["too_long"] == len(turns)
    assert result["turns"]["draw"] == 0.0 and result["draw_opened"] == 1.0 and result["turns"]["caption"] == 1.0


def test_a_reply_box_is_its_loc_span_in_canvas_pixels():
    assert reply_box("the box " + loc_text((8, 16, 32, 48), S.CANVAS)) == (8.0, 16.0, 32.0, 48.0)
    assert reply_box("a large red circle") is None and reply_box("<loc>0.1 0.2</loc>") is None and reply_box("<loc>a b c d</loc>") is None


def test_an_untrained_model_is_scored_through_the_chat_api(micro_nextmm):
    result = evaluate_conversations(micro_nextmm, 3, seed=SEED, max_new_tokens=6)
    turns = [t for s in S.make_samples("conversation", SEED, 3) for t in s.meta["turns"]]
    assert sum(result["counts"].values()) + result["too_long"] == len(turns) and sum(result["counts"].values()) > 0
    assert 0.0 <= result["overall"] <= 1.0 and all(isinstance(e["prediction"], str) for e in result["examples"])
    # the scored replies are the model's own: the first example's is what chat() says to that turn alone
    first = result["examples"][0]
    sample = next(S.make_samples("conversation", SEED, 1))
    assert first["question"] == sample.meta["turns"][0]["question"]
    assert micro_nextmm.chat(turn_prompts(sample)[0], max_new_tokens=6).text == first["prediction"]
