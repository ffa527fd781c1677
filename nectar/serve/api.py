"""The OpenAI-compatible wire format: pydantic models of the requests nectar serves, and its error shape.

pydantic checks every field (types, ranges) before a request reaches the engine, so a bad request is
answered with a 400 in OpenAI's `{"error": {...}}` shape and never touches the decode batch.
"""
from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields OpenAI clients send that nectar ignores (user, ...)

    model: str
    max_tokens: int | None = Field(None, description="answer tokens at most (default: the server's cap)")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None  # {"include_usage": true} adds a last chunk with the token counts
    n: int = Field(1, ge=1, le=1, description="one choice per request")

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, stop):
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
        return stop

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def question(self) -> str:
        """The last user message: a compiled document answers one question at a time."""
        users = [m.text() for m in self.messages if m.role == "user"]
        if not users or not users[-1].strip():
            raise ValueError("the messages hold no user message with text: put the question in one")
        return users[-1]

    def answer_cap(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(Sampling):
    prompt: str
    max_tokens: int | None = 16  # OpenAI's default for completions

    def answer_cap(self) -> int | None:
        return self.max_tokens


def error(message: str, kind: str = "invalid_request_error", code: str | None = None,
          param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_response(rid: str, model: str, text: str, finish: str, prompt: int, completion: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                         "logprobs": None}],
            "usage": usage(prompt, completion)}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def completion_response(rid: str, model: str, text: str, finish: str | None, prompt: int | None = None,
                        completion: int | None = None, chunk: bool = False) -> dict:
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}
    if not chunk:
        body["usage"] = usage(prompt, completion)
    return body
