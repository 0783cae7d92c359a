"""The OpenAI chat-completions format: request models, response and chunk builders, the error shape.

Only what seechat serves is modelled; fields the OpenAI API has and seechat does not use are ignored,
fields it cannot honour (n > 1) are refused. Types are checked strictly: "0.5" is not a number.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """A request the server answers with an OpenAI-style error object and a 4xx status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -- the request ----------------------------------------------------------------------------------------
class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImageURL(_Model):
    url: str
    detail: str | None = None
    """Accepted and ignored: every image gets the bridge's fixed number of tokens."""


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL | str
    """The OpenAI form is {"url": ...}; a bare URL string is accepted too, as several clients send it."""

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None
    name: str | None = None


class StreamOptions(_Model):
    include_usage: bool = False


class ChatCompletionRequest(_Model):
    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    """The served model's name; left out, the served model answers."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    n: int = Field(default=1, ge=1, le=1)
    # not in the OpenAI API, accepted as vLLM does
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)

    @classmethod
    def parse(cls, obj) -> "ChatCompletionRequest":
        """Validate a decoded JSON body; a wrong type or a missing field becomes a 400 naming the field."""
        if not isinstance(obj, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            return cls.model_validate(obj)
        except ValidationError as exc:
            message, param = _explain(exc)
            raise APIError(400, message, param=param) from None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise APIError(400, "stop: give at most 4 non-empty strings", param="stop")
        for stop in stops:
            checked_text(stop, "stop")
        return stops


_UNION_LABELS = {"str", "int", "float", "bool", "TextPart", "ImagePart", "ImageURL", "Message", "StreamOptions"}


def _explain(exc: ValidationError) -> tuple[str, str | None]:
    """One readable message for a validation error: the deepest problem, its field path without pydantic's
    union labels ('str', 'list[...]', the part's type tag)."""
    errors = exc.errors(include_url=False)
    deepest = max(errors, key=lambda e: len(e["loc"]))
    path: list = []
    loc = deepest["loc"]
    for i, p in enumerate(loc):
        label = isinstance(p, str) and (p in _UNION_LABELS or "[" in p or p.startswith("function-"))
        tag = p in ("text", "image_url") and i > 0 and isinstance(loc[i - 1], int) and i + 1 < len(loc)
        if not (label or tag):
            path.append(p)
    param = ".".join(str(p) for p in path) or None
    message = deepest["msg"]
    if path and path[-1] == "content" and len(errors) > 1:
        message = "must be a string or a list of {'type': 'text'} and {'type': 'image_url'} parts"
    return f"{param or 'body'}: {message}", param


def checked_text(text: str, where: str) -> str:
    """`text`, if it is valid Unicode (JSON can carry lone surrogates, which no tokenizer takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{where}: the text holds an unpaired surrogate (\\ud800-\\udfff), not valid Unicode",
                       param=where) from None
    return text


# -- responses ------------------------------------------------------------------------------------------
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; cached_tokens are the prompt tokens whose KV came from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion(id: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
               cached_tokens: int = 0) -> dict:
    return {
        "id": id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
    }


def chunk(id: str, model: str, created: int, delta: dict | None = None, finish_reason: str | None = None,
          usage_: dict | None = None) -> dict:
    """One server-sent event's data; with `usage_` it is the usage-only chunk (no choices)."""
    out = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model}
    if usage_ is not None:
        out["choices"], out["usage"] = [], usage_
    else:
        out["choices"] = [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}]
    return out


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "seechat"}
