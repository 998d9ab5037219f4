"""What the server reads and writes, in OpenAI's shapes: the request bodies (checked with pydantic), their messages
turned into nextmm's (chat.py: strings, PIL images), the responses and stream chunks, and the error body
`{"error": {"message", "type", "param", "code"}}` that OpenAI's clients raise as exceptions.

Pictures come in as `image_url` content parts holding data URLs (`data:image/png;base64,...`); a local path or
`file://` URL is read only when the server was started with `--allow-local-files`; the server fetches nothing from
the network. Pictures go out the same way: an `image_url` part whose URL is a PNG data URL.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union
from urllib.parse import unquote, urlparse

from PIL import Image as PILImage
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """A request the server refuses, as OpenAI would: an HTTP status and one sentence saying what to change."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "invalid_request_error", 504: "timeout"}.get(self.status)
        if kind is None:
            kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """What one request may ask of the server (`nextmm serve`'s flags)."""

    max_body_bytes: int = 32 << 20
    max_image_bytes: int = 8 << 20
    max_image_pixels: int = 4096 * 4096
    max_images: int = 8  # pictures in a chat request, and drawings (n) in an images request
    max_tokens: int = 512
    timeout_s: float = 120.0
    allow_local_files: bool = False


# -- requests ---------------------------------------------------------------------------------------------------

class _Loose(BaseModel):
    # Clients send many fields this server has no use for (temperature, user, ...): they are accepted and ignored.
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Loose):
    url: str
    detail: Optional[str] = None


class TextPart(_Loose):
    type: Literal["text"]
    text: str


class ImagePart(_Loose):
    type: Literal["image_url"]
    image_url: Union[ImageURL, str]


class Message(_Loose):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[Union[TextPart, ImagePart]], None] = None


class StreamOptions(_Loose):
    include_usage: bool = False


class ChatRequest(_Loose):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1


class ImagesRequest(_Loose):
    prompt: str
    model: Optional[str] = None
    n: int = 1
    size: Optional[str] = None
    response_format: Optional[str] = None


def parse(kind: type[BaseModel], body: Any) -> BaseModel:
    """The request body as `kind`, or a 400 naming the first field that is wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body is a JSON {type(body).__name__}, not an object; send a JSON object with the request's fields")
    try:
        return kind.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise ApiError(400, f"the request's field '{where}' is wrong ({first['msg']}); fix it and send the request again", param=where) from None


def max_new_tokens(request: ChatRequest, limits: Limits) -> int:
    """The tokens the reply may have: what the request asks (max_completion_tokens, or the older max_tokens), the
    server's limit when it asks nothing."""
    asked = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    if asked is None:
        return limits.max_tokens
    if not 1 <= asked <= limits.max_tokens:
        raise ApiError(400, f"max_tokens {asked} is out of range; this server writes from 1 to {limits.max_tokens} tokens per reply", param="max_tokens")
    return asked


# -- messages in ------------------------------------------------------------------------------------------------

def to_messages(messages: list[Message], limits: Limits) -> list[dict]:
    """OpenAI messages -> nextmm's (chat.py): text parts as strings, pictures decoded to PIL images, "developer"
    read as "system" (OpenAI's newer name for it)."""
    out, pictures = [], 0
    for m, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if message.content is None or isinstance(message.content, str):
            out.append({"role": role, "content": message.content or ""})
            continue
        if role == "system":  # the model's system prompt is text alone (chat.py)
            if not all(isinstance(part, TextPart) for part in message.content):
                raise ApiError(400, f"messages[{m}] is a system message with an image; a system message holds text only", param=f"messages[{m}]")
            out.append({"role": role, "content": "".join(part.text for part in message.content)})
            continue
        parts: list = []
        for p, part in enumerate(message.content):
            if isinstance(part, TextPart):
                parts.append(part.text)
                continue
            pictures += 1
            if pictures > limits.max_images:
                raise ApiError(400, f"the request holds more than {limits.max_images} images, this server's limit per request; send fewer", param="messages")
            url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
            parts.append(read_picture(url, limits, f"messages[{m}].content[{p}]"))
        out.append({"role": role, "content": parts})
    return out


def read_picture(url: str, limits: Limits, where: str) -> PILImage.Image:
    """The picture an image_url names: a data URL, or (with allow_local_files) a local path or file:// URL."""
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header[5:].startswith("image/"):
            raise ApiError(400, f"{where} is not an image data URL; send data:image/png;base64,... (or image/jpeg)", param=where)
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise _too_large(where, limits)
        try:
            data = base64.b64decode(payload, validate=True) if header.endswith(";base64") else unquote(payload).encode("latin-1")
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise ApiError(400, f"{where}'s data URL is not valid base64; encode the image file's bytes with base64", param=where) from None
    else:
        scheme = urlparse(url).scheme
        if scheme in ("http", "https"):
            raise ApiError(400, f"{where} is a web address and this server fetches nothing from the network; send the image as a data URL", param=where)
        if not limits.allow_local_files:
            raise ApiError(400, f"{where} names a local file and this server reads none (start it with --allow-local-files); send the image as a data URL", param=where)
        path = Path(unquote(urlparse(url).path) if scheme == "file" else url)
        if not path.is_file():
            raise ApiError(400, f"{where} names '{path}', which is not a file on the server; check the path", param=where)
        if path.stat().st_size > limits.max_image_bytes:
            raise _too_large(where, limits)
        data = path.read_bytes()
    if len(data) > limits.max_image_bytes:
        raise _too_large(where, limits)
    return _decode(data, limits, where)


def _too_large(where: str, limits: Limits) -> ApiError:
    return ApiError(413, f"{where} is larger than this server's limit of {limits.max_image_bytes / 2**20:g} MiB per image; send a smaller image", param=where)


def _decode(data: bytes, limits: Limits, where: str) -> PILImage.Image:
    try:
        with PILImage.open(io.BytesIO(data)) as image:
            # the header's size, checked before the pixels are decoded: a small file can unpack to a huge image
            if image.width * image.height > limits.max_image_pixels:
                raise ApiError(413, f"{where} is {image.width}x{image.height} pixels, more than this server's limit of "
                                    f"{limits.max_image_pixels} pixels per image; send a smaller image", param=where)
            return image.convert("RGB")
    except ApiError:
        raise
    except Exception as err:  # PIL raises many types for data that is not an image (UnidentifiedImageError, OSError, ...)
        raise ApiError(400, f"{where} is not an image PIL can read ({type(err).__name__}); send a PNG or JPEG", param=where) from None


# -- responses --------------------------------------------------------------------------------------------------

def png_base64(image: PILImage.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png_data_url(image: PILImage.Image) -> str:
    return "data:image/png;base64," + png_base64(image)


def image_part(image: PILImage.Image) -> dict:
    return {"type": "image_url", "image_url": {"url": png_data_url(image)}}


def finish_reason(reason: str) -> str:
    """OpenAI's clients know "stop" and "length": a reply that ended in a drawing stopped there."""
    return "length" if reason == "length" else "stop"


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(id_: str, model: str, text: str, images: list, reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """A whole chat completion; its content is a string, or a list of parts when the reply holds drawings."""
    content: Any = text if not images else ([{"type": "text", "text": text}] if text else []) + [image_part(i) for i in images]
    return {
        "id": id_, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason(reason)}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(id_: str, model: str, delta: dict | None, reason: str | None = None, usage_: dict | None = None) -> dict:
    """One streamed chunk: a delta of the message, or (delta None) the closing usage chunk with no choices."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": reason}]
    body = {"id": id_, "object": "chat.completion.chunk", "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body
