"""The OpenAI API's wire format: request bodies as pydantic models, and errors as OpenAI's JSON.

Errors are `{"error": {"message", "type", "param", "code"}}` with a 4xx status for anything
the client can fix. Request fields gemmakit does not implement are accepted when set to a value
that changes nothing, and answered 400 otherwise (`unsupported`).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
)


class APIError(Exception):
    """An error answered as OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(e: APIError) -> JSONResponse:
    """The HTTP response for `e` (401s name the Bearer scheme, as RFC 6750 asks)."""
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


# Numbers as JSON writes them: an int or a float, never a bool or a numeric string (OpenAI
# refuses `"max_tokens": true` and `"temperature": "1"`); NaN and Infinity, which Python's JSON
# parser accepts, are refused by `allow_inf_nan=False` below.
Number = Annotated[float, Strict()]
# OpenAI's documented range for both penalties.
Penalty = Annotated[Number, Field(ge=-2.0, le=2.0)]


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class SpeculativeConfig(BaseModel):
    """A request's speculative decoding, under vLLM's `speculative_config` names (vLLM sets it
    per server; here each request may ask): `method` "ngram" (prompt lookup)."""

    model_config = ConfigDict(extra="forbid")

    method: str
    num_speculative_tokens: StrictInt = 8


class SamplingFields(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored, as vLLM does."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str | None = None
    # Ranges are checked where SamplingParams is built (one check for the API and the server).
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    min_p: Number | None = None
    max_tokens: StrictInt | None = None
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[str, Number] | None = None
    repetition_penalty: Number | None = None  # vLLM's extension: HF's multiplicative penalty
    ignore_eos: StrictBool = False  # vLLM's extension: generate max_tokens whatever comes (benchmarks)
    speculative_config: SpeculativeConfig | None = None  # gemmakit's: speculation per request


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def text_parts_hold_strings(cls, content):
        # OpenAI refuses a content part whose "text" is not a string; the chat template
        # would fail on it later with an error that is not the client's to read.
        for part in content if isinstance(content, list) else ():
            if "text" in part and not isinstance(part["text"], str):
                raise ValueError("a content part's text must be a string")
        return content


class ChatCompletionRequest(SamplingFields):
    messages: list[Message]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: dict | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    suffix: str | None = None


def parse(model_cls: type[BaseModel], data: dict):
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        msg = err["msg"] if err["type"] != "missing" else "this field is required"
        raise APIError(400, f"{param}: {msg}" if param else msg, param=param) from None


def unsupported(req, fields: dict[str, Any]) -> None:
    """400 for an option gemmakit does not implement set to a value that would change output."""
    for name, neutral in fields.items():
        value = getattr(req, name)
        if value is not None and value not in neutral:
            raise APIError(400, f"{name}={value!r} is not supported by this server", param=name)


def response_schema(response_format: dict | None) -> dict | None:
    """The JSON schema a chat `response_format` asks for: None for text, `{"type": "object"}`
    for `json_object`, the given schema for `json_schema` (checked by the grammar engine)."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(
                400,
                "response_format.json_schema.schema must be a JSON schema object",
                param="response_format",
            )
        from gemmakit.errors import GemmakitError
        from gemmakit.inference.grammar import check_schema

        try:
            check_schema(schema)
        except GemmakitError as e:
            raise APIError(400, str(e), param="response_format") from None
        return schema
    raise APIError(
        400,
        f"response_format type {kind!r} is not one of text, json_object, json_schema",
        param="response_format",
    )
