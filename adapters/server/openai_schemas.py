"""Request and response bodies of the OpenAI-compatible routes.

Every field OpenAI defines is either honoured or refused with a 400 that names it: unknown keys
are refused (`StrictRequestModel`), and fields this server does not implement (tools, logprobs,
reasoning, audio, n > 1, ...) are accepted only at their neutral value. Fields that cannot change
the answer (`user`, `metadata`, `safety_identifier`, `prompt_cache_key`) are accepted and unused.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from .request_model import StrictRequestModel

Role = Literal["system", "user", "assistant", "tool"]
StopString = Annotated[str, Field(max_length=256)]
FinishReason = Literal["stop", "length"]
#: The most `logit_bias` entries one request may carry.
MAX_LOGIT_BIAS = 1024
Unsupported = Annotated[None, Field(description="Not supported: leave it out (or null).")]


class StreamOptions(StrictRequestModel):
    include_usage: bool | None = False


class ResponseFormat(StrictRequestModel):
    type: Literal["text"] = "text"


class _Request(StrictRequestModel):
    model: str | None = Field(None, description="Any name is accepted; the served model answers.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy (default 1).")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, description="Extension: keep the k most likely tokens (0 = off).")
    n: int | None = Field(None, ge=1, le=1, description="Only 1 is supported.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=4, fail_fast=True)] | None = Field(
        None, description="Up to 4 strings; the reply ends before the first."
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="Extension: HF-style penalty.")
    logit_bias: (
        Annotated[
            dict[str, Annotated[float, Field(ge=-100.0, le=100.0, strict=True)]],
            Field(max_length=MAX_LOGIT_BIAS, fail_fast=True),
        ]
        | None
    ) = Field(
        None,
        description="Token id (as a decimal string) -> bias added to its logit before sampling: "
        "-100 bans the token, 100 all but forces it.",
    )
    user: str | None = Field(None, description="Accepted; not used.")


class ChatMessage(StrictRequestModel):
    role: Role
    content: str
    name: Unsupported = Field(None, description="Not supported (chat templates have no participant names).")


class ChatCompletionRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1, fail_fast=True)]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Literal[False] | None = Field(None, description="Not supported: only false.")
    top_logprobs: int | None = Field(None, ge=0, le=0, description="Not supported: only 0.")
    tools: list[Any] | None = Field(None, max_length=0, description="Not supported: only empty.")
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: Unsupported = None
    functions: list[Any] | None = Field(None, max_length=0, description="Not supported (legacy): only empty.")
    function_call: Literal["none", "auto"] | None = Field(None, description="Legacy; no functions are supported.")
    response_format: ResponseFormat | None = None
    reasoning_effort: Unsupported = None
    verbosity: Unsupported = None
    modalities: Annotated[list[Literal["text"]], Field(max_length=1)] | None = None
    audio: Unsupported = None
    prediction: Unsupported = None
    web_search_options: Unsupported = None
    tool_prompt: Unsupported = None
    store: Literal[False] | None = Field(None, description="Nothing is stored: only false.")
    service_tier: Literal["auto", "default"] | None = None
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None = Field(
        None, description="Accepted; not used."
    )
    safety_identifier: str | None = Field(None, description="Accepted; not used.")
    prompt_cache_key: str | None = Field(None, description="Accepted; not used.")


class CompletionRequest(_Request):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)]
    ) = Field(description="One prompt (a list must hold exactly one).")
    max_tokens: int | None = Field(None, ge=1, description="Default 16, as OpenAI's.")
    echo: bool | None = Field(False, description="Put the prompt before the completion.")
    logprobs: int | None = Field(None, ge=0, le=0, description="Not supported: only 0 or null.")
    suffix: str | None = Field(None, max_length=0, description="Not supported.")
    best_of: int | None = Field(None, ge=1, le=1, description="Only 1 is supported.")


# ---------------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    """What one chunk adds: the first names the role, the last (with `finish_reason`) is empty."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion (the stream ends with `data: [DONE]`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None


class Completion(BaseModel):
    """The body of a completion, and of each `data:` event when streamed (`finish_reason` null until the last)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
