"""OpenAI wire format: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

Any model name is accepted (`huggingface_hub.InferenceClient` sends "dummy") and every answer
names the served model. Sampling follows OpenAI's defaults (temperature 1, top_p 1); temperature
0 is greedy. Stop strings are cut from the reply, also when streaming (text that could begin a
stop string is held back until it cannot).

Here: parsing, limits and starting the generations (one per choice, `n`, in the same decode
batch; a seeded request's choice i samples with seed + i). `reply_plan` decides tools and
grammars, `openai_reply` turns generations into choices and events.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request

from .constraints import Grammar
from .errors import ApiError, bad_request, error_docs
from .generation import GenerationRequest
from .openai_reply import (
    ToolPlan,
    chat_choice,
    chat_choice_events,
    completion_choice,
    completion_choice_events,
    merged_events,
)
from .openai_reply import usage as _usage
from .openai_schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    _Request,
    content_text,
)
from .openai_schemas import Completion as CompletionBody
from .reply_plan import plan_tools
from .request_model import body_doc, parse
from .sampling import SamplingParams
from .service import ModelService, stop_strings
from .sse import EventStream, stream_docs


def _sampling(service: ModelService, body: _Request, choice: int = 0) -> SamplingParams:
    seed = body.seed if body.seed is None or choice == 0 else (body.seed + choice) % 2**63  # n choices differ
    return SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        seed=seed,
        repetition_penalty=body.repetition_penalty or 1.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        logit_bias=service.logit_bias(body.logit_bias),
    )


class _Meta:
    """The fields every chunk of one response repeats."""

    def __init__(self, service: ModelService, kind: str, prompt_tokens: int) -> None:
        self.id = f"{kind}-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.model = service.model_name
        self.fingerprint = service.fingerprint
        self.prompt_tokens = prompt_tokens

    def head(self, obj: str) -> dict:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }


@dataclass
class _Prepared:
    """A request parsed, tokenized and checked (in a worker thread), ready to start: one
    generation per choice (`n`)."""

    body: ChatCompletionRequest | CompletionRequest
    gens: list[GenerationRequest]
    echo: str = ""
    tools: ToolPlan | None = None


def _choices(service: ModelService, body: _Request) -> int:
    n = body.n or 1
    most = service.scheduler.max_batch_size
    if n > most:
        raise bad_request(f"n is {n} but this server decodes at most {most} sequences together (--max-batch-size)", "n")
    return n


def _generations(
    service: ModelService, body: _Request, prompt: list[int], limit: int, grammar: Grammar | None, top: int
) -> list[GenerationRequest]:
    stop = stop_strings(body.stop)
    return [
        GenerationRequest(
            tuple(prompt),
            limit,
            _sampling(service, body, i),
            stop,
            constraint=service.grammars.start(grammar) if grammar is not None else None,
            top_logprobs=top,
        )
        for i in range(_choices(service, body))
    ]


def _message(message: Any) -> dict[str, Any]:
    """A parsed message as a dict, its content a string (text parts joined)."""
    out = message.model_dump(exclude_none=True, by_alias=True)
    if "content" in out:
        out["content"] = content_text(message.content)
    return out


def _reply_limit(body: ChatCompletionRequest) -> tuple[int | None, str]:
    """The reply's token limit and the field it came from: `max_completion_tokens` (OpenAI's
    name now), else the older `max_tokens`; both given, they must agree."""
    new, old = body.max_completion_tokens, body.max_tokens
    if new is not None and old is not None and new != old:
        raise bad_request(
            f"max_completion_tokens ({new}) and max_tokens ({old}) disagree; send one of them "
            "(max_tokens is the older name of max_completion_tokens)",
            "max_completion_tokens",
        )
    return (new, "max_completion_tokens") if new is not None else (old, "max_tokens")


def build_router(service: ModelService) -> APIRouter:
    router = APIRouter(tags=["OpenAI"])
    errors_doc = error_docs(openai=True)

    def prepare_chat(raw: bytes) -> _Prepared:
        body = parse(ChatCompletionRequest, raw)
        if body.top_logprobs and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        messages = [_message(m) for m in body.messages]
        plan = plan_tools(service, body)
        prompt = service.encode_chat(messages, plan.rendered, plan.fmt)
        wanted, param = _reply_limit(body)
        limit = service.max_new_tokens(len(prompt), wanted, param, prompt_param="messages")
        top = (body.top_logprobs or 0) if body.logprobs else 0
        return _Prepared(body, _generations(service, body, prompt, limit, plan.grammar, top), tools=plan.reading)

    def prepare_completion(raw: bytes) -> _Prepared:
        body = parse(CompletionRequest, raw)
        text = body.prompt[0] if isinstance(body.prompt, list) else body.prompt  # the schema allows one
        if body.echo and body.logprobs is not None:
            raise bad_request(
                "logprobs with echo would need the prompt's log-probabilities, which this server does not compute; "
                "drop echo or logprobs",
                "logprobs",
            )
        prompt = service.encode_text(text)
        # OpenAI's default for completions is 16 tokens
        limit = service.max_new_tokens(len(prompt), body.max_tokens, default=16, prompt_param="prompt")
        gens = _generations(service, body, prompt, limit, None, body.logprobs or 0)
        return _Prepared(body, gens, echo=text if body.echo else "")

    @router.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        response_model_exclude_unset=True,  # a field the reply does not have is left out, as OpenAI does
        responses={
            **stream_docs(
                ChatCompletionChunk,
                "The reply; with `stream`, chat.completion.chunk events then `data: [DONE]`",
                done=True,
            ),
            **errors_doc,
        },
        openapi_extra=body_doc(ChatCompletionRequest),
        summary="Chat completion (OpenAI format)",
    )
    async def chat_completions(request: Request):
        ready = await service.prepare(request, prepare_chat)
        body, gens = ready.body, ready.gens
        assert isinstance(body, ChatCompletionRequest)
        handles = service.start_all(gens)
        meta = _Meta(service, "chatcmpl", len(gens[0].prompt_ids))
        logprobs, top = bool(body.logprobs), bool(body.top_logprobs)
        piece = service.token_piece
        if body.stream:
            events = [
                chat_choice_events(i, h, gens[i].stop, ready.tools, logprobs, top, piece) for i, h in enumerate(handles)
            ]
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(
                merged_events(meta.head("chat.completion.chunk"), events, meta.prompt_tokens, usage), handles
            )
        done = await service.complete_all(handles, request)
        return {
            **meta.head("chat.completion"),
            "choices": [chat_choice(i, d, ready.tools, logprobs, top, piece) for i, d in enumerate(done)],
            "usage": _usage(meta.prompt_tokens, sum(len(d.tokens) for d in done)),
        }

    @router.post(
        "/v1/completions",
        response_model=CompletionBody,
        response_model_exclude_unset=True,
        responses={
            **stream_docs(
                CompletionBody, "The completion; with `stream`, text_completion events then `data: [DONE]`", done=True
            ),
            **errors_doc,
        },
        openapi_extra=body_doc(CompletionRequest),
        summary="Text completion (OpenAI format)",
    )
    async def completions(request: Request):
        ready = await service.prepare(request, prepare_completion)
        body, gens = ready.body, ready.gens
        assert isinstance(body, CompletionRequest)
        handles = service.start_all(gens)
        meta = _Meta(service, "cmpl", len(gens[0].prompt_ids))
        piece = service.token_piece
        if body.stream:
            events = [
                completion_choice_events(i, h, gens[i].stop, ready.echo, body.logprobs, piece)
                for i, h in enumerate(handles)
            ]
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(merged_events(meta.head("text_completion"), events, meta.prompt_tokens, usage), handles)
        done = await service.complete_all(handles, request)
        return {
            **meta.head("text_completion"),
            "choices": [completion_choice(i, d, ready.echo, body.logprobs, piece) for i, d in enumerate(done)],
            "usage": _usage(meta.prompt_tokens, sum(len(d.tokens) for d in done)),
        }

    @router.get("/v1/models", response_model=ModelList, responses=errors_doc, summary="The served model")
    async def models():
        return {"object": "list", "data": [_card(service)]}

    @router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=errors_doc, summary="One model")
    async def model(model_id: str):
        if model_id != service.model_name:
            raise ApiError(
                404,
                f"the model {model_id!r} does not exist; this server serves {service.model_name!r}",
                param="model",
                code="model_not_found",
            )
        return _card(service)

    return router


def _card(service: ModelService) -> dict:
    return {"id": service.model_name, "object": "model", "created": service.created, "owned_by": "torus-sparse"}
