"""What `gptforge serve` reads and writes: the OpenAI-compatible request and response bodies as pydantic
models, and the error shape {"error": {"message", "type", "param", "code"}} (APIError, error_response).
The routes are in serve/api.py, the answers are produced in serve/serving.py."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_serializer

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               503: "server_error"}


# ---- errors ---------------------------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo

    @classmethod
    def of(cls, status: int, message: str, param: str | None = None, code: str | None = None) -> "ErrorResponse":
        return cls(error=ErrorInfo(message=message, type=ERROR_TYPES.get(status, "server_error"), param=param,
                                   code=code))


class APIError(Exception):
    """Raised anywhere under a route: answered as error_response(status, message, param, code)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse.of(status, message, param, code).model_dump(), status_code=status)


# ---- requests -------------------------------------------------------------------------------------------------
def _unicode(text: str) -> str:
    """JSON can carry a lone surrogate (\\ud800) that no tokenizer takes: refuse it here, as bad input."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text holds a lone surrogate {text[e.start]!r} at character {e.start}; send "
                         "valid Unicode text") from None
    return text


def _unicode_all(v: str | list[str] | None):
    for text in [v] if isinstance(v, str) else v or []:
        _unicode(text)
    return v


Text = Annotated[str, AfterValidator(_unicode)]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class SamplingRequest(BaseModel):
    """The fields both routes share."""

    model_config = ConfigDict(extra="ignore")  # OpenAI fields we do not use (presence_penalty, user, ...)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's, but common (vLLM, litgpt)
    stop: str | list[str] | None = None
    ignore_eos: bool = False  # not OpenAI's (vLLM's): generate max_tokens whatever the model samples
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)  # what torch.Generator.manual_seed takes
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stop_unicode(cls, v):
        return _unicode_all(v)


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _prompt_unicode(cls, v):
        return _unicode_all(v)


# ---- responses ------------------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    logprobs: None = None
    finish_reason: str


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None


class Answer(BaseModel):
    """The fields of every completion body and stream chunk."""

    id: str
    object: str
    created: int
    model: str


class ChatCompletion(Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class Completion(Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage


class Delta(BaseModel):
    """What a chat stream chunk adds: the role (first chunk), text, or nothing (the finishing chunk)."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _given(self) -> dict:
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Answer):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class CompletionChunk(Answer):  # OpenAI's legacy completions stream chunks of object "text_completion"
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class UsageChunk(Answer):
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""

    choices: list = []
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gptforge"
    context_length: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    context: int
    active: int
    waiting: int
    cancelled: int
    max_batch: int
    max_tokens_cap: int
    default_max_tokens: int
