"""`nextmm serve` through OpenAI's own Python client: a live uvicorn server on 127.0.0.1 over a tiny model saved by
the test (its LLM moved by N(0, 0.3), as in test_chat.py, so that greedy replies change from token to token), chats
streamed and not, pictures in and out, requests decoded together, and every bad input refused with OpenAI's error
body while the server goes on serving."""

import base64
import contextlib
import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from PIL import Image as PILImage

import nextmm
from nextmm.api import NextMM
from nextmm.serve import app as serve_app
from nextmm.serve.app import Settings, address, create_app, listen
from nextmm.serve.schema import ApiError, Limits, read_picture
from nextmm.worlds.shapes import generator as shapes

NAME = "tiny-emu"
KEY = "sk-test-key"
LIMITS = dict(max_images=2, max_image_bytes=64 << 10, max_body_bytes=1 << 20, max_tokens=100)


@pytest.fixture(scope="module")
def model_dir(chatty, tmp_path_factory) -> Path:
    return chatty.save(tmp_path_factory.mktemp("models") / NAME)


@pytest.fixture(scope="module")
def m(model_dir) -> NextMM:
    return nextmm.load(model_dir, device="cpu")


class Running:
    def __init__(self, url: str, batcher):
        self.url, self.batcher = url, batcher

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()


@contextlib.contextmanager
def running(m: NextMM, **options):
    """A live server over `m` in a thread, on a free port of 127.0.0.1, stopped on leaving."""
    app = create_app(m, Settings(model_name=NAME, **options))
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    ends = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < ends:
        time.sleep(0.01)
    assert server.started
    try:
        yield Running(address(sock), app.state.batcher)
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server(m):
    with running(m, api_key=KEY, max_batch=4, limits=Limits(**LIMITS)) as s:
        yield s


def picture(i: int) -> PILImage.Image:
    return shapes.sample_scene(np.random.default_rng([5, i])).image()


def data_url(image: PILImage.Image, kind: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return f"data:image/{kind.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def decoded(url: str) -> PILImage.Image:
    assert url.startswith("data:image/png;base64,")
    return PILImage.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def ask(text: str, *images: PILImage.Image) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def chat(client: openai.OpenAI, messages: list[dict], tokens: int = 8, **kwargs):
    return client.chat.completions.create(model=NAME, messages=messages, max_tokens=tokens, **kwargs)


def streamed(client: openai.OpenAI, messages: list[dict], tokens: int = 8) -> tuple[list, str]:
    chunks = list(chat(client, messages, tokens, stream=True, stream_options={"include_usage": True}))
    return chunks, "".join(c.choices[0].delta.content for c in chunks if c.choices and isinstance(c.choices[0].delta.content, str))


def test_models_and_health(server):
    assert [model.id for model in server.client().models.list()] == [NAME]
    assert server.client().models.retrieve(NAME).id == NAME
    health = server.health()
    assert health["status"] == "ok" and health["model"] == NAME


def test_a_streamed_chat_is_the_whole_chat_piece_by_piece(server, m):
    client = server.client()
    messages = [{"role": "system", "content": "you answer briefly"}, {"role": "user", "content": "what shape is the red object?"}]
    whole = chat(client, messages, 12)
    reply = m.chat(messages, max_new_tokens=12)
    assert whole.choices[0].message.content == reply.text and len(reply.text) > 5
    assert whole.choices[0].finish_reason == "length" and whole.model == NAME
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (reply.prompt_tokens, 12)
    chunks, text = streamed(client, messages, 12)
    assert text == reply.text and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length" and not chunks[-1].choices
    assert chunks[-1].usage.total_tokens == reply.prompt_tokens + 12


def test_a_picture_in_is_read_as_the_library_reads_it(server, m):
    messages = ask("describe the picture.", picture(0))
    answer = chat(server.client(), messages, 10).choices[0].message.content
    assert answer == m.chat([{"role": "user", "content": [picture(0), "describe the picture."]}], max_new_tokens=10).text
    assert answer != chat(server.client(), ask("describe the picture.", picture(1)), 10).choices[0].message.content


def test_a_local_file_is_read_only_when_allowed(tmp_path):
    picture(0).save(tmp_path / "scene.png")
    allowed = Limits(allow_local_files=True)
    for url in (str(tmp_path / "scene.png"), (tmp_path / "scene.png").as_uri()):
        assert np.array_equal(np.asarray(read_picture(url, allowed, "part")), np.asarray(picture(0)))
        with pytest.raises(ApiError, match="--allow-local-files") as err:
            read_picture(url, Limits(), "part")
        assert err.value.status == 400
    with pytest.raises(ApiError, match="fetches nothing from the network"):
        read_picture("https://example.com/a.png", allowed, "part")


def hold_the_worker(monkeypatch, m: NextMM) -> threading.Event:
    """The next decode waits at its first step until the returned event is set: requests queue up meanwhile."""
    release, real = threading.Event(), m.model.logits
    waited = []

    def held(hidden, *rest):
        if not waited:
            waited.append(True)
            assert release.wait(30)
        return real(hidden, *rest)

    monkeypatch.setattr(m.model, "logits", held)
    return release


def wait_for(condition, seconds: float = 30) -> None:
    ends = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < ends, "the server did not get there in time"
        time.sleep(0.02)


def queued_behind_one(server, monkeypatch, m: NextMM, first, rest) -> None:
    """`first` (a callable sending a request) is decoded alone while the worker is held; the `rest` queue up behind it
    meanwhile and are decoded together once it is let go. Returns when every one has its answer."""
    batches = server.health()["batches"]
    release = hold_the_worker(monkeypatch, m)
    blocker = threading.Thread(target=first)
    blocker.start()
    wait_for(lambda: server.health()["batches"] == batches + 1)
    together = [threading.Thread(target=send) for send in rest]
    for t in together:
        t.start()
    wait_for(lambda: server.health()["queued"] == len(rest))
    release.set()
    for t in [blocker, *together]:
        t.join(60)


def test_requests_that_arrive_together_are_decoded_in_one_batch_each_as_it_is_alone(server, monkeypatch, m):
    requests = [(ask("describe the picture.", picture(2)), 9), (ask("what shape is the red object?"), 5),
                (ask("what color is the circle?", picture(3)), 12), (ask("hello"), 7)]
    alone = [chat(server.client(), messages, n).choices[0].message.content for messages, n in requests]
    assert len(set(alone)) == 4
    before = server.health()
    results: dict[int, str] = {}

    def send(i: int) -> None:
        results[i] = chat(server.client(), *requests[i]).choices[0].message.content

    queued_behind_one(server, monkeypatch, m, lambda: send(0), [lambda i=i: send(i) for i in range(4)])
    after = server.health()
    assert after["batches"] == before["batches"] + 2 and after["requests"] == before["requests"] + 5
    assert after["largest_batch"] == 4
    assert [results[i] for i in range(4)] == alone


def test_a_request_that_fails_in_the_model_fails_alone(server, monkeypatch, m):
    good = ask("what shape is the red object?")
    expected = chat(server.client(), good).choices[0].message.content
    real = m.replies

    def failing(conversations, *args, **kwargs):  # a model that breaks on one conversation breaks the batch holding it
        if any("boom" in str(c[-1]["content"]) for c in conversations):
            raise RuntimeError("boom")
        return real(conversations, *args, **kwargs)

    monkeypatch.setattr(m, "replies", failing)
    before = server.health()
    results: dict[str, object] = {}

    def send(key: str, messages: list[dict]) -> None:
        try:
            results[key] = chat(server.client(), messages).choices[0].message.content
        except openai.APIStatusError as err:
            results[key] = err

    queued_behind_one(server, monkeypatch, m, lambda: send("blocker", good), [lambda: send("bad", ask("boom")), lambda: send("good", good)])
    assert results["blocker"] == results["good"] == expected
    assert results["bad"].status_code == 500 and "failed on this request (RuntimeError: boom)" in results["bad"].body["message"]
    after = server.health()
    assert (after["batches"], after["requests"]) == (before["batches"] + 2, before["requests"] + 3)  # the two were one batch
    assert chat(server.client(), good).choices[0].message.content == expected


def slow_steps(monkeypatch, m: NextMM, seconds: float) -> None:
    real = m.model.logits
    monkeypatch.setattr(m.model, "logits", lambda hidden, *rest: time.sleep(seconds) or real(hidden, *rest))


def test_a_client_that_goes_away_mid_stream_is_stopped_and_the_others_finish(server, monkeypatch, m):
    long, others = ask("tell me about the shapes."), [(ask("describe the picture.", picture(4)), 20), (ask("hello"), 20)]
    assert chat(server.client(), long, 100).choices[0].finish_reason == "length"  # it would write all 100 tokens
    alone = [chat(server.client(), messages, n).choices[0].message.content for messages, n in others]
    before = server.health()
    slow_steps(monkeypatch, m, 0.01)
    release = hold_the_worker(monkeypatch, m)
    results: dict[int, str] = {}

    def send(i: int) -> None:
        results[i] = chat(server.client(), *others[i]).choices[0].message.content

    blocker = threading.Thread(target=send, args=(1,))
    blocker.start()
    wait_for(lambda: server.health()["batches"] == before["batches"] + 1)
    stream = chat(server.client(), long, 100, stream=True)  # decoded in one batch with the two below
    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: server.health()["queued"] == 3)
    release.set()
    next(c for c in stream if c.choices and c.choices[0].delta.content)
    stream.close()  # the client goes away
    for t in [blocker, *threads]:
        t.join(60)
    assert [results[0], results[1]] == alone
    wait_for(lambda: server.health()["stopped"] == before["stopped"] + 1)
    after = server.health()
    assert (after["batches"], after["requests"]) == (before["batches"] + 2, before["requests"] + 4)  # the three were one batch
    monkeypatch.undo()
    assert chat(server.client(), *others[0]).choices[0].message.content == alone[0]  # nothing of it is left behind


def test_a_reply_past_the_time_limit_ends_there(m, monkeypatch):
    slow_steps(monkeypatch, m, 0.02)
    with running(m, limits=Limits(timeout_s=0.3)) as s:
        reply = chat(s.client(), ask("tell me about the shapes."), 100)
        assert reply.choices[0].finish_reason == "length" and 0 < reply.usage.completion_tokens < 100
        assert s.health()["stopped"] == 1


@pytest.fixture(scope="module")
def drawer(model_dir) -> NextMM:
    """The model, made to open a picture at once (the untrained model rarely does), as in test_chat.py."""
    m = nextmm.load(model_dir, device="cpu")
    img, real = m.tokenizer.img_id, m.model.logits

    def drawing_logits(hidden, *rest):
        logits = real(hidden, *rest)
        logits[..., img] = logits.max() + 1
        return logits

    m.model.logits = drawing_logits
    return m


def test_a_drawing_comes_back_as_an_image_url_part(drawer):
    with running(drawer) as s:
        reply = chat(s.client(), ask("draw a large red circle."))
        parts = reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop" and [p["type"] for p in parts] == ["image_url"]
        assert decoded(parts[0]["image_url"]["url"]).size == (64, 64)
        chunks, text = streamed(s.client(), ask("draw a large red circle."))
        contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert text == "" and len(contents) == 1 and contents[0][0]["type"] == "image_url"
        assert decoded(contents[0][0]["image_url"]["url"]).size == (64, 64)
        assert chunks[-2].choices[0].finish_reason == "stop"
    without = NextMM(drawer.model, drawer.tokenizer, drawer.config)
    with running(without) as s:
        reply = chat(s.client(), ask("draw a large red circle."))
        assert "has no visual decoder" in reply.choices[0].message.content
        assert "has no visual decoder" in streamed(s.client(), ask("draw a large red circle."))[1]
        with pytest.raises(openai.BadRequestError, match="no visual decoder"):
            s.client().images.generate(prompt="a large red circle")


def test_images_generations_return_pngs_at_the_models_size(server):
    client = server.client()
    result = client.images.generate(model=NAME, prompt="a large red circle", n=2, response_format="b64_json")
    images = [PILImage.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in result.data]
    assert len(images) == 2 and all(i.size == (64, 64) and i.format == "PNG" for i in images)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))  # each from its own noise
    with pytest.raises(openai.BadRequestError, match="draws 64x64 images only"):
        client.images.generate(prompt="a large red circle", size="1024x1024")
    with pytest.raises(openai.BadRequestError, match="response_format b64_json"):
        client.images.generate(prompt="a large red circle", response_format="url")
    with pytest.raises(openai.BadRequestError, match="from 1 to 2 images"):
        client.images.generate(prompt="a large red circle", n=3)


def noise(side: int) -> PILImage.Image:
    return PILImage.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))


def image_part(url: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is it?"}]}


BAD = {
    "unknown model": (lambda c: c.chat.completions.create(model="gpt-4o", messages=ask("hi")), 404, "does not exist on this server"),
    "not an image": (lambda c: chat(c, [image_part("data:image/png;base64," + base64.b64encode(b"hello").decode())]), 400, "is not an image"),
    "not base64": (lambda c: chat(c, [image_part("data:image/png;base64,@@@")]), 400, "not valid base64"),
    "image too large": (lambda c: chat(c, [image_part(data_url(noise(160)))]), 413, "limit of 0.0625 MiB per image"),
    "too many images": (lambda c: chat(c, ask("compare them.", picture(0), picture(1), picture(2))), 400, "more than 2 images"),
    "web address": (lambda c: chat(c, [image_part("https://example.com/cat.png")]), 400, "fetches nothing from the network"),
    "prompt past the context": (lambda c: chat(c, ask("a " * 200)), 400, "leaves no room for a reply"),
    "too many tokens": (lambda c: chat(c, ask("hi"), 101), 400, "from 1 to 100 tokens"),
    "no messages": (lambda c: c.chat.completions.create(model=NAME, messages=[]), 400, "'messages'"),
    "last message not the user's": (lambda c: chat(c, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]), 400,
                                    "last message must be the user's"),
    "wrong key": (lambda c: chat(c.with_options(api_key="sk-wrong"), ask("hi")), 401, "the API key is wrong"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_in_one_sentence_and_the_server_serves_on(server, m, case):
    request, status, words = BAD[case]
    client = server.client()
    with pytest.raises(openai.APIStatusError) as err:
        request(client)
    assert err.value.status_code == status
    message = err.value.body["message"]
    assert words in message and message.count(". ") == 0 and set(err.value.body) == {"message", "type", "param", "code"}
    good = [{"role": "user", "content": "what shape is the red object?"}]
    assert chat(client, good, 6).choices[0].message.content == m.chat(good, max_new_tokens=6).text  # and it goes on serving


def test_a_prompt_past_the_context_has_openais_code(server):
    with pytest.raises(openai.BadRequestError) as err:
        chat(server.client(), ask("a " * 200))
    assert err.value.code == "context_length_exceeded"


def raw(server, body: bytes, headers: dict | None = None, path: str = "/v1/chat/completions") -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    return httpx.post(server.url + path, content=body, headers=headers, timeout=30)


def test_malformed_json_an_oversized_body_and_a_missing_key_are_refused(server):
    bad = raw(server, b'{"model": "tiny-emu", "messages": [')
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    assert raw(server, b"[1, 2]").status_code == 400
    big = raw(server, json.dumps({"model": NAME, "messages": ask("x" * (3 << 19))}).encode())
    assert big.status_code == 413 and "limit of 1 MiB" in big.json()["error"]["message"]
    for headers in ({"Authorization": ""}, {"Authorization": "Basic abc"}):
        refused = raw(server, json.dumps({"model": NAME, "messages": ask("hi")}).encode(), headers)
        assert refused.status_code == 401 and "needs an API key" in refused.json()["error"]["message"]
        assert refused.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
    lost = httpx.get(server.url + "/v1/nowhere", timeout=10)
    assert lost.status_code == 404 and "GET /v1/nowhere" in lost.json()["error"]["message"]
    assert server.health()["status"] == "ok"


def test_the_web_page_is_served_at_the_root_when_there_is_one(server, tmp_path, monkeypatch):
    shipped = httpx.get(server.url + "/", timeout=10)
    assert shipped.status_code == 200 and "/v1/chat/completions" in shipped.text
    monkeypatch.setattr(serve_app, "STATIC", tmp_path)
    assert httpx.get(server.url + "/", timeout=10).status_code == 404
    (tmp_path / "index.html").write_text("<title>nextmm</title>")
    page = httpx.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and "<title>nextmm</title>" in page.text


def test_nextmm_serve_says_where_it_listens_and_serves(model_dir):
    process = subprocess.Popen([sys.executable, "-m", "nextmm.cli", "serve", "--model", str(model_dir), "--port", "0", "--device", "cpu"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith(f"nextmm: serving '{NAME}' at http://127.0.0.1:")
        url = line.split(" at ")[1].split("/v1")[0]
        reply = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30).chat.completions.create(
            model=NAME, messages=ask("hello"), max_tokens=3)
        assert reply.usage.completion_tokens <= 3
    finally:
        process.terminate()
        process.wait(20)


def test_nextmm_serve_refuses_bad_flags_in_one_sentence(model_dir, tmp_path, capsys):
    from test_cli import assert_one_clear_line, run

    assert_one_clear_line(*run(capsys, "serve", "--model", str(tmp_path / "missing"))[::2], "not a nextmm model directory")
    assert_one_clear_line(*run(capsys, "serve", "--model", str(model_dir), "--max-batch", "0")[::2], "--max-batch 0")
    assert_one_clear_line(*run(capsys, "serve", "--model", str(model_dir), "--port", "99999")[::2], "--port 99999 is not a port")
    with listen("127.0.0.1", 0) as taken:
        port = str(taken.getsockname()[1])
        assert_one_clear_line(*run(capsys, "serve", "--model", str(model_dir), "--port", port)[::2], "cannot listen", "--port")
