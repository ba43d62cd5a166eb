"""Request and response bodies of the OpenAI-compatible routes.

Every field OpenAI defines is either honoured or refused with a 400 that names it: unknown keys
are refused (`StrictRequestModel`), and fields this server does not implement (legacy `functions`,
reasoning, audio, ...) are accepted only at their neutral value. Fields that cannot change the
answer (`user`, `metadata`, `safety_identifier`, `prompt_cache_key`) are accepted and unused.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, WithJsonSchema, field_validator, model_validator

from .request_model import RequestModel, StrictRequestModel

#: The most stop strings one request may give, and the longest one (characters).
MAX_STOP, MAX_STOP_LENGTH = 4, 256
StopString = Annotated[str, Field(max_length=MAX_STOP_LENGTH)]
FinishReason = Literal["stop", "length", "tool_calls"]
#: The most tools one request may define, and the most alternatives `top_logprobs` may ask for (OpenAI's limits).
MAX_TOOLS, MAX_TOP_LOGPROBS = 128, 20
FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
#: The most `logit_bias` entries one request may carry.
MAX_LOGIT_BIAS = 1024
Unsupported = Annotated[None, Field(description="Not supported: leave it out (or null).")]


class StreamOptions(StrictRequestModel):
    include_usage: bool | None = Field(False, description="End the stream with a chunk that holds usage.")
    include_obfuscation: bool | None = Field(None, description="Accepted; no padding is added either way.")


class ResponseFormatText(StrictRequestModel):
    type: Literal["text"]


class ResponseFormatJsonObject(StrictRequestModel):
    """The reply is one JSON object (constrained decoding: it always parses)."""

    type: Literal["json_object"]


class JsonSchemaSpec(StrictRequestModel):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON Schema the reply matches.")
    strict: bool | None = Field(None, description="Either way the reply is decoded to match the schema.")


class ResponseFormatJsonSchema(StrictRequestModel):
    """The reply is JSON matching `json_schema.schema` (constrained decoding: it always validates)."""

    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


def _by_type(tags: dict[str, str]):
    """A callable discriminator: the union member a value's `type` (or a bare string) selects, so a
    wrong body gets that member's error only. Tags are capitalised: `errors._loc` drops them."""

    def pick(value: Any) -> str | None:
        kind = value if isinstance(value, str) else (value.get("type") if isinstance(value, dict) else None)
        return tags.get(kind) if isinstance(kind, str) else None

    return Discriminator(pick, custom_error_type="invalid_type", custom_error_message=_one_of(tags))


def _one_of(tags: dict[str, str]) -> str:
    return "must be one of " + ", ".join(repr(k) for k in tags if k != "function")


ResponseFormat = Annotated[
    Annotated[ResponseFormatText, Tag("Text")]
    | Annotated[ResponseFormatJsonObject, Tag("JsonObject")]
    | Annotated[ResponseFormatJsonSchema, Tag("JsonSchema")],
    _by_type({"text": "Text", "json_object": "JsonObject", "json_schema": "JsonSchema"}),
]


class FunctionDefinition(StrictRequestModel):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON Schema of the arguments (none: no arguments).")
    strict: bool | None = Field(
        None, description="With tool_choice required or this function named, the arguments always match."
    )


class Tool(StrictRequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName_(StrictRequestModel):
    name: FunctionName


class NamedToolChoice(StrictRequestModel):
    type: Literal["function"]
    function: FunctionName_


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("Mode")] | Annotated[NamedToolChoice, Tag("Function")],
    _by_type({"none": "Mode", "auto": "Mode", "required": "Mode", "function": "Function"}),
]


class FunctionCallIn(StrictRequestModel):
    name: FunctionName
    arguments: str = Field(description="The arguments as JSON text (an object).")


class ToolCallIn(StrictRequestModel):
    id: Annotated[str, Field(max_length=256)]
    type: Literal["function"] = "function"
    function: FunctionCallIn


class _Request(StrictRequestModel):
    model: str | None = Field(None, description="Any name is accepted; the served model answers.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy (default 1).")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, description="Extension: keep the k most likely tokens (0 = off).")
    n: int | None = Field(
        None, ge=1, description="Choices to generate, decoded together (at most the server's batch size)."
    )
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP, fail_fast=True)] | None = Field(
        None, description="Up to 4 strings of at most 256 characters; the reply ends before the first."
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

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_limits(cls, value: Any) -> Any:
        """Say which limit a stop list breaks (the union's own errors name neither)."""
        items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings are allowed, got {len(items)}")
        for i, item in enumerate(items):
            if isinstance(item, str) and len(item) > MAX_STOP_LENGTH:
                where = "the stop string" if isinstance(value, str) else f"stop string {i}"
                raise ValueError(f"{where} has {len(item)} characters; at most {MAX_STOP_LENGTH} are allowed")
        return value


_NoName = Annotated[None, Field(description="Not supported (chat templates have no participant names).")]


class TextPart(StrictRequestModel):
    type: Literal["text"]
    text: str


class RefusalPart(StrictRequestModel):
    """An earlier assistant refusal, replayed: read as its text."""

    type: Literal["refusal"]
    refusal: str


class MediaPart(RequestModel):
    """An image, audio or file part: parsed only to be refused (this model reads text only). The
    published schema has no such part, so a schema-valid body never holds one."""

    type: Literal["image_url", "input_audio", "file"]

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        kind = value.get("type") if isinstance(value, dict) else None
        raise ValueError(f"this is an {kind} part, but this model reads text only; send text parts or a string")


#: The most parts one message's content may hold.
MAX_PARTS = 256
ContentPart = Annotated[
    Annotated[TextPart, Tag("Text")]
    | Annotated[RefusalPart, Tag("Refusal")]
    | Annotated[MediaPart, Tag("Media"), WithJsonSchema({"not": {}})],
    _by_type({"text": "Text", "refusal": "Refusal", "image_url": "Media", "input_audio": "Media", "file": "Media"}),
]
#: A message's content: a string, or an array of parts (text parts are joined in order, one line apart).
Content = Annotated[
    Annotated[str, Tag("String")]
    | Annotated[list[ContentPart], Field(max_length=MAX_PARTS, fail_fast=True), Tag("Parts")],
    Discriminator(
        lambda v: "String" if isinstance(v, str) else "Parts" if isinstance(v, list) else None,
        custom_error_type="invalid_type",
        custom_error_message="must be a string or an array of text parts",
    ),
    Field(description="A string, or text parts (joined in order, one line apart); text only."),
]
PART_SEPARATOR = "\n"


def content_text(content: str | list[TextPart | RefusalPart] | None) -> str | None:
    """A message's content as the chat template takes it: the string, or its text parts joined."""
    if content is None or isinstance(content, str):
        return content
    return PART_SEPARATOR.join(p.text if isinstance(p, TextPart) else p.refusal for p in content)


class SystemMessage(StrictRequestModel):
    """A system turn; `developer` is the same turn under OpenAI's newer name."""

    role: Literal["system", "developer"]
    content: Content
    name: _NoName = None


class UserMessage(StrictRequestModel):
    role: Literal["user"]
    content: Content
    name: _NoName = None


class AssistantText(StrictRequestModel):
    """An assistant turn with text (and possibly the calls it made)."""

    role: Literal["assistant"]
    content: Content
    tool_calls: Annotated[list[ToolCallIn], Field(min_length=1, max_length=MAX_TOOLS)] | None = None
    name: _NoName = None
    refusal: None = Field(None, description="Accepted as null (the server never refuses).")
    function_call: Unsupported = None


class AssistantCalls(StrictRequestModel):
    """An assistant turn that only called tools (content null or absent)."""

    role: Literal["assistant"]
    content: None = None
    tool_calls: Annotated[list[ToolCallIn], Field(min_length=1, max_length=MAX_TOOLS)]
    name: _NoName = None
    refusal: None = Field(None, description="Accepted as null (the server never refuses).")
    function_call: Unsupported = None


class ToolMessage(StrictRequestModel):
    """A tool's result, answering the call `tool_call_id`."""

    role: Literal["tool"]
    content: Content
    tool_call_id: Annotated[str, Field(max_length=256)] | None = None


def _message_kind(value: Any) -> str | None:
    if not isinstance(value, dict):
        return "User"  # any message model reports a non-object as "Input should be an object"
    role = value.get("role")
    if role == "assistant":
        return "Text" if value.get("content") is not None or "tool_calls" not in value else "Calls"
    return {"system": "System", "developer": "System", "user": "User", "tool": "Tool"}.get(role)  # type: ignore[arg-type]


ChatMessage = Annotated[
    Annotated[SystemMessage, Tag("System")]
    | Annotated[UserMessage, Tag("User")]
    | Annotated[AssistantText, Tag("Text")]
    | Annotated[AssistantCalls, Tag("Calls")]
    | Annotated[ToolMessage, Tag("Tool")],
    Discriminator(
        _message_kind,
        custom_error_type="invalid_role",
        custom_error_message="role must be one of 'system', 'developer', 'user', 'assistant', 'tool'",
    ),
]


class ChatCompletionRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1, fail_fast=True)]
    max_tokens: int | None = Field(None, ge=1, description="Deprecated by OpenAI: max_completion_tokens.")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="The most tokens the reply may have (with max_tokens too, both must agree)."
    )
    logprobs: bool | None = Field(None, description="Log-probabilities of the reply's tokens.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="Most likely alternatives per token (needs logprobs)."
    )
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS, fail_fast=True)] | None = None
    tool_choice: ToolChoice | None = Field(
        None, description="Default auto with tools; required / a named function: exactly one valid call."
    )
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call per reply.")
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
    logprobs: int | None = Field(
        None, ge=0, le=5, description="Log-probabilities of the tokens, with this many alternatives each."
    )
    suffix: str | None = Field(None, max_length=0, description="Not supported.")
    best_of: int | None = Field(None, ge=1, le=1, description="Only 1 is supported.")


# ---------------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A piece of a streamed tool call: the first names id, type and function name; later ones add arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    """What one chunk adds: the first names the role, the last (with `finish_reason`) is empty."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
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


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
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
