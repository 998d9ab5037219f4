"""The web page at `/` (serve/static/index.html), end to end as a person uses it: a live `nextmm serve` on
localhost, Debian's headless Chromium driven by selenium. Pictures are attached by upload and by paste, answers
stream in, drawings show inline, the API key is asked for, errors read as the server's sentence, and every step
leaves a screenshot (in pytest's tmp dir, and copied to $NEXTMM_ARTIFACTS when that is set).

The served model is scripted (`scripted_model`): an untrained model says and draws whatever its random weights
choose, so its reply to every conversation is fixed here, ANSWER and then a drawing, whose arrival the test checks
piece by piece against what the API sends for the same request."""

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

import nextmm
from nextmm.api import NextMM, build_model
from nextmm.config import make_config
from nextmm.models.decoder import VisualDecoder
from nextmm.worlds.shapes import generator as shapes

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="the web page's test needs Debian's headless Chromium: apt-get install -y chromium chromium-driver",
)

ANSWER = "the answer is a circle"
KEY = "web-test-key"
WAIT_S = 60  # for the server to load, a reply and a drawing on a busy 2-core machine; ends early when done


def scripted_model(tokenizer, path: Path) -> Path:
    """A micro model with a visual decoder whose every reply is ANSWER, then a drawing. Its layers add nothing to
    the residual stream (their output projections are zero), so the next token depends on the current token
    alone: one embedding dimension per token of the chain `:` (where the assistant's turn opens) -> ANSWER's tokens
    -> [IMG], and an untied output row that reads each dimension as the chain's next token."""
    cfg = make_config("micro")
    cfg.llm.vocab_size = tokenizer.vocab_size
    cfg.llm.tie_embeddings = False
    cfg.decoder.sample_steps = 3
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    chain = [tokenizer.encode(":")[-1], *tokenizer.encode(ANSWER), tokenizer.img_id]
    assert len(set(chain)) == len(chain) <= cfg.llm.width, chain  # a token twice would loop
    llm = model.llm
    with torch.no_grad():
        for layer in llm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        llm.lm_head.weight.zero_()
        for k, (token, following) in enumerate(zip(chain, chain[1:])):
            llm.embed_tokens.weight[token] = 0.0
            llm.embed_tokens.weight[token, k] = 1.0
            llm.lm_head.weight[following, k] = 10.0
    decoder = VisualDecoder(cfg.decoder, cfg.resampler.width, cfg.resampler.num_queries, semantic_width=cfg.clip_text.embed_dim)
    return NextMM(model, tokenizer, cfg, decoder=decoder).save(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(url: str, path: str, body: dict | None = None, key: str | None = KEY) -> bytes:
    request = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})})
    with urllib.request.urlopen(request, timeout=WAIT_S) as response:
        return response.read()


def refusal(url: str, key: str | None) -> str:
    """The server's sentence when it refuses `key` (None: no key)."""
    with pytest.raises(urllib.error.HTTPError) as refused:
        api(url, "/v1/models", key=key)
    assert refused.value.code == 401
    return json.loads(refused.value.read())["error"]["message"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer):
    model = scripted_model(tokenizer, tmp_path_factory.mktemp("web") / "model")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(nextmm.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    log = tmp_path_factory.mktemp("web-server") / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "nextmm.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
                                    "--port", str(port), "--api-key", KEY], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            assert process.poll() is None, f"nextmm serve exited with {process.returncode}:\n{log.read_text()}"
            try:
                api(url, "/health", key=None)
                break
            except OSError:
                assert time.monotonic() < deadline, f"nextmm serve did not answer in {WAIT_S} s:\n{log.read_text()}"
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,820"):
        options.add_argument(argument)
    # An explicit Service with Debian's chromedriver: Selenium Manager then downloads no driver or browser of its own.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("web-screenshots")
    kept = os.environ.get("NEXTMM_ARTIFACTS")

    def take(driver, name: str) -> Path:
        path = folder / f"{name}.png"
        assert driver.save_screenshot(str(path)), path
        if kept:
            Path(kept).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(kept) / path.name)
        return path

    return take


@pytest.fixture()
def page(browser, server):
    """The page, freshly loaded with no key remembered; afterwards, its script must have logged no error."""
    browser.get(server + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    browser.get_log("browser")  # what is logged from here on is this test's
    yield browser
    script_errors = [e for e in browser.get_log("browser") if e["source"] in ("javascript", "console-api") and e["level"] == "SEVERE"]
    assert not script_errors


def wait(driver, condition, what: str):
    return WebDriverWait(driver, WAIT_S).until(condition, f"waited {WAIT_S} s for {what}")


def by_id(driver, element_id: str):
    return driver.find_element(By.ID, element_id)


def enter_key(driver, key: str) -> None:
    field = by_id(driver, "api-key")
    field.clear()
    field.send_keys(key, Keys.TAB)  # leaving the field is its "change"


def replies(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#log .message.assistant")


def wait_for_reply(driver, count: int):
    wait(driver, lambda d: len(replies(d)) == count and replies(d)[-1].get_attribute("data-state") != "streaming", f"reply {count}")
    return replies(driver)[-1]


def record_text(driver) -> None:
    """Keeps each piece of text the page adds to a reply, in order: the page adds a text node per piece that
    arrives, and each mutation record keeps the node it added, so no piece is missed however fast they come."""
    driver.execute_script("""
        window.shownTexts = [];
        new MutationObserver((records) => {
            for (const r of records) for (const n of r.addedNodes)
                if (n.nodeType === Node.TEXT_NODE && n.parentElement.matches('.message.assistant .text')) window.shownTexts.push(n.data);
        }).observe(document.getElementById('log'), {childList: true, subtree: true});""")


def streamed(url: str, messages: list, max_tokens: int | None) -> list[str | list]:
    """The delta contents the API streams for `messages`, in order."""
    body = {"model": json.loads(api(url, "/v1/models"))["data"][0]["id"], "messages": messages, "stream": True}
    if max_tokens:
        body["max_tokens"] = max_tokens
    events = api(url, "/v1/chat/completions", body).decode().split("\n\n")
    datas = [e.removeprefix("data: ") for e in events if e.startswith("data: ")]
    assert datas[-1] == "[DONE]"
    return [c["choices"][0]["delta"]["content"] for c in map(json.loads, datas[:-1])
            if c["choices"] and c["choices"][0]["delta"].get("content")]


def png_pixels(data_url: str) -> np.ndarray:
    head, b64 = data_url.split(",", 1)
    assert head == "data:image/png;base64", head
    return np.asarray(PILImage.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=int)


def test_the_page_chats_over_a_picture_streams_the_answer_and_shows_the_drawings(page, server, screenshots, tmp_path, tokenizer):
    picture = tmp_path / "scene.png"
    shapes.sample_scene(np.random.default_rng([9, 0])).image().save(picture)
    enter_key(page, KEY)
    served = json.loads(api(server, "/v1/models"))["data"][0]["id"]
    wait(page, lambda d: by_id(d, "model-name").text == f"model: {served}", "the model's name")

    by_id(page, "attach").send_keys(str(picture))
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#pending img"), "the attached picture's thumbnail")
    tokens = len(tokenizer.encode(ANSWER))  # a limit that ends the reply before it draws
    by_id(page, "max-tokens").send_keys(str(tokens))
    by_id(page, "prompt").send_keys("what is in the picture?")
    screenshots(page, "1-question")
    record_text(page)
    by_id(page, "send").click()
    answer = wait_for_reply(page, 1)

    # The question went with the uploaded file itself, shown as a thumbnail in its message.
    sent = page.execute_script("return conversation")
    assert [m["role"] for m in sent] == ["user", "assistant"]
    url = base64.b64encode(picture.read_bytes()).decode()
    assert sent[0]["content"] == [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{url}"}},
                                  {"type": "text", "text": "what is in the picture?"}]
    thumbs = page.find_elements(By.CSS_SELECTOR, "#log .message.user img.thumb")
    assert [t.get_attribute("src") for t in thumbs] == [f"data:image/png;base64,{url}"]
    assert not page.find_elements(By.CSS_SELECTOR, "#pending img")
    # The answer arrived piece by piece, each piece shown as it came, as the API streams the same request.
    pieces = streamed(server, sent[:1], tokens)
    assert answer.find_element(By.CSS_SELECTOR, ".text").text == "".join(pieces) == ANSWER
    assert int(answer.get_attribute("data-chunks")) == len(pieces) >= 3
    shown = page.execute_script("return window.shownTexts")
    assert shown == pieces  # shown one by one as they came
    assert sent[1] == {"role": "assistant", "content": ANSWER}
    assert answer.find_element(By.CSS_SELECTOR, ".meta").text == "stopped at the token limit"
    assert not answer.find_elements(By.CSS_SELECTOR, "img")
    screenshots(page, "2-streamed-answer")

    # Asked to draw, with the token limit lifted, it answers and draws: the picture is shown inline.
    by_id(page, "max-tokens").clear()
    by_id(page, "prompt").send_keys("draw a large red circle.", Keys.ENTER)
    drawn = wait_for_reply(page, 2)
    sent = page.execute_script("return conversation")
    assert [m["role"] for m in sent] == ["user", "assistant", "user", "assistant"]
    pieces = streamed(server, sent[:3], None)
    assert isinstance(pieces[-1], list) and [p["type"] for p in pieces[-1]] == ["image_url"]
    assert drawn.find_element(By.CSS_SELECTOR, ".text").text == ANSWER == "".join(p for p in pieces if isinstance(p, str))
    assert int(drawn.get_attribute("data-chunks")) == len(pieces)
    image = wait(page, lambda d: drawn.find_element(By.CSS_SELECTOR, "img.drawing"), "the drawing")
    wait(page, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image), "the drawing to load")
    src = image.get_attribute("src")
    assert sent[3]["content"] == [{"type": "text", "text": ANSWER}, {"type": "image_url", "image_url": {"url": src}}]
    shown, again = png_pixels(src), png_pixels(pieces[-1][0]["image_url"]["url"])
    assert shown.shape == again.shape == (64, 64, 3) and np.abs(shown - again).max() <= 2  # the same drawing
    assert image.size["width"] >= 200  # scaled up to be seen
    screenshots(page, "3-drawing-in-chat")

    # The Draw button asks /v1/images/generations for the text; the picture joins the conversation.
    by_id(page, "prompt").send_keys("a small blue square")
    by_id(page, "draw").click()
    made = wait_for_reply(page, 3)
    wait(page, lambda d: made.find_elements(By.CSS_SELECTOR, "img.drawing"), "the Draw button's picture")
    sent = page.execute_script("return conversation")
    assert sent[4] == {"role": "user", "content": "a small blue square"}
    assert [p["type"] for p in sent[5]["content"]] == ["image_url"]
    assert png_pixels(sent[5]["content"][0]["image_url"]["url"]).shape == (64, 64, 3)
    page.execute_script("document.getElementById('log').scrollTop = 0")
    screenshots(page, "4-draw-button-top")
    page.execute_script("document.getElementById('log').scrollTop = 1e9")
    screenshots(page, "5-draw-button")

    by_id(page, "clear").click()
    assert not page.find_elements(By.CSS_SELECTOR, "#log .message")
    assert page.execute_script("return conversation") == []


def test_the_page_asks_for_the_key_shows_errors_as_a_line_and_takes_pasted_pictures(page, server, screenshots, tmp_path):
    # Without a key the server refuses: the page says so, and keeps the message to send again.
    wait(page, lambda d: by_id(d, "model-name").text == "model: API key needed", "the page to ask for a key")
    by_id(page, "prompt").send_keys("hello", Keys.ENTER)
    error = wait(page, lambda d: by_id(d, "error") if by_id(d, "error").is_displayed() else None, "the error line")
    assert error.text.startswith(refusal(server, None)) and "API key" in error.text
    assert by_id(page, "prompt").get_attribute("value") == "hello"
    assert not page.find_elements(By.CSS_SELECTOR, "#log .message")
    assert "needs-key" in by_id(page, "api-key").get_attribute("class")
    screenshots(page, "6-key-needed")

    # With the key, the same message is answered.
    enter_key(page, KEY)
    assert not by_id(page, "error").is_displayed()
    by_id(page, "send").click()
    assert wait_for_reply(page, 1).find_element(By.CSS_SELECTOR, ".text").text == ANSWER

    # A pasted picture waits as a thumbnail, and goes when removed; a file that is no picture is refused in a line.
    pasted = io.BytesIO()
    shapes.sample_scene(np.random.default_rng([9, 1])).image().save(pasted, "PNG")
    page.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], 'pasted.png', {type: 'image/png'}));
        document.getElementById('prompt').dispatchEvent(new ClipboardEvent('paste', {clipboardData: data, bubbles: true}));
    """, base64.b64encode(pasted.getvalue()).decode())
    thumb = wait(page, lambda d: d.find_element(By.CSS_SELECTOR, "#pending img"), "the pasted picture's thumbnail")
    assert thumb.get_attribute("src") == "data:image/png;base64," + base64.b64encode(pasted.getvalue()).decode()
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    by_id(page, "attach").send_keys(str(notes))
    wait(page, lambda d: by_id(d, "error").is_displayed(), "the refusal of a text file")
    assert by_id(page, "error").text == "notes.txt is not a picture (text/plain)."
    # A picture too large to send whole is scaled down to 1024 pixels on its longer side.
    large = tmp_path / "large.png"
    PILImage.fromarray(np.random.default_rng(0).integers(0, 256, (900, 1200, 3), dtype=np.uint8)).save(large)
    assert large.stat().st_size > 2 << 20
    by_id(page, "attach").send_keys(str(large))
    wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#pending img")) == 2, "the large picture's thumbnail")
    head, b64 = page.find_elements(By.CSS_SELECTOR, "#pending img")[1].get_attribute("src").split(",", 1)
    assert head == "data:image/jpeg;base64" and PILImage.open(io.BytesIO(base64.b64decode(b64))).size == (1024, 768)
    screenshots(page, "7-pasted-picture-and-refused-file")
    for _ in range(2):
        page.find_element(By.CSS_SELECTOR, "#pending button.remove").click()
    assert not page.find_elements(By.CSS_SELECTOR, "#pending img")

    # A wrong key: the server's sentence, as a line.
    enter_key(page, "wrong-key")
    by_id(page, "prompt").send_keys("hello again", Keys.ENTER)
    wait(page, lambda d: by_id(d, "error").is_displayed(), "the wrong key's error")
    assert by_id(page, "error").text.startswith(refusal(server, "wrong-key"))
    assert len(page.execute_script("return conversation")) == 2  # the refused message is not part of it
    screenshots(page, "8-wrong-key")
