"""OpenAI wire format: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

Any model name is accepted (`huggingface_hub.InferenceClient` sends "dummy") and every answer
names the served model. Sampling follows OpenAI's defaults (temperature 1, top_p 1); temperature
0 is greedy. Stop strings are cut from the reply, also when streaming (text that could begin a
stop string is held back until it cannot).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import APIRouter, Request

from .detok import HoldBack
from .errors import ApiError, error_docs, openai_body
from .generation import CANCELLED, ERROR, LENGTH, Completion, GenerationRequest, Handle
from .openai_schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    _Request,
)
from .openai_schemas import Completion as CompletionBody
from .request_model import body_doc, parse
from .sampling import SamplingParams
from .service import ModelService, failure, stop_strings
from .sse import DONE, EventStream, openai_event, stream_docs


def _finish(reason: str) -> str:
    return "length" if reason == LENGTH else "stop"


def _sampling(service: ModelService, body: _Request) -> SamplingParams:
    return SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        seed=body.seed,
        repetition_penalty=body.repetition_penalty or 1.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        logit_bias=service.logit_bias(body.logit_bias),
    )


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _stream_error(err: ApiError) -> str:
    """The event that ends a stream that failed: OpenAI's error object (the `openai` client raises it)."""
    return openai_event(openai_body(err.status, err.message, err.param, err.code))


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


class _Reply:
    """Reads a generation's steps as (text to show, finish reason or None), stop strings held back and cut."""

    def __init__(self, handle: Handle, stop: tuple[str, ...]) -> None:
        self.handle = handle
        self.hold = HoldBack(stop)
        self.tokens = 0
        self.error: ApiError | None = None

    async def pieces(self) -> AsyncIterator[tuple[str, str | None]]:
        hold = self.hold
        async for step in self.handle.steps():
            if step.finish_reason in (CANCELLED, ERROR):
                self.error = failure(step) if step.finish_reason == ERROR else ApiError(500, "generation was cancelled")
                return
            assert step.token is not None
            self.tokens += 1
            text = step.token.reply_text
            if step.finish_reason is None:
                yield hold.push(text), None
            elif step.stop_at is not None:
                yield hold.push(text, end=step.stop_at), step.finish_reason
            else:
                yield hold.push(text) + hold.finish(), step.finish_reason


@dataclass
class _Prepared:
    """A request parsed, tokenized and checked (in a worker thread), ready to start."""

    body: ChatCompletionRequest | CompletionRequest
    gen: GenerationRequest
    echo: str = ""


def build_router(service: ModelService) -> APIRouter:
    router = APIRouter(tags=["OpenAI"])
    errors_doc = error_docs(openai=True)

    def prepare_chat(raw: bytes) -> _Prepared:
        body = parse(ChatCompletionRequest, raw)
        prompt = service.encode_chat([m.model_dump(include={"role", "content"}) for m in body.messages])
        wanted, param = (
            (body.max_completion_tokens, "max_completion_tokens")
            if body.max_completion_tokens
            else (body.max_tokens, "max_tokens")
        )
        limit = service.max_new_tokens(len(prompt), wanted, param, prompt_param="messages")
        return _Prepared(
            body, GenerationRequest(tuple(prompt), limit, _sampling(service, body), stop_strings(body.stop))
        )

    def prepare_completion(raw: bytes) -> _Prepared:
        body = parse(CompletionRequest, raw)
        text = body.prompt[0] if isinstance(body.prompt, list) else body.prompt  # the schema allows one
        prompt = service.encode_text(text)
        # OpenAI's default for completions is 16 tokens
        limit = service.max_new_tokens(len(prompt), body.max_tokens, default=16, prompt_param="prompt")
        gen = GenerationRequest(tuple(prompt), limit, _sampling(service, body), stop_strings(body.stop))
        return _Prepared(body, gen, echo=text if body.echo else "")

    @router.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
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
        body, gen = ready.body, ready.gen
        handle = service.start(gen)
        meta = _Meta(service, "chatcmpl", len(gen.prompt_ids))
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(_chat_events(handle, gen.stop, meta, usage), handle)
        done = await service.complete(handle, request)
        return {
            **meta.head("chat.completion"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": done.text_before_stop},
                    "logprobs": None,
                    "finish_reason": _finish(done.finish_reason),
                }
            ],
            "usage": _usage(done.prompt_tokens, len(done.tokens)),
        }

    @router.post(
        "/v1/completions",
        response_model=CompletionBody,
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
        body, gen = ready.body, ready.gen
        handle = service.start(gen)
        meta = _Meta(service, "cmpl", len(gen.prompt_ids))
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(_completion_events(handle, gen.stop, meta, usage, ready.echo), handle)
        done: Completion = await service.complete(handle, request)
        return {
            **meta.head("text_completion"),
            "choices": [
                {
                    "index": 0,
                    "text": ready.echo + done.text_before_stop,
                    "logprobs": None,
                    "finish_reason": _finish(done.finish_reason),
                }
            ],
            "usage": _usage(done.prompt_tokens, len(done.tokens)),
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


async def _chat_events(handle: Handle, stop: tuple[str, ...], meta: _Meta, usage: bool) -> AsyncIterator[str]:
    head = meta.head("chat.completion.chunk")

    def chunk(delta: dict, finish: str | None = None) -> str:
        return openai_event(
            {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        )

    yield chunk({"role": "assistant", "content": ""})  # as OpenAI: the role once, in the first chunk
    reply = _Reply(handle, stop)
    async for text, reason in reply.pieces():
        if text:
            yield chunk({"content": text})
        if reason is not None:
            yield chunk({}, _finish(reason))
    if reply.error:
        yield _stream_error(reply.error)
        yield DONE
        return
    if usage:
        yield openai_event({**head, "choices": [], "usage": _usage(meta.prompt_tokens, reply.tokens)})
    yield DONE


async def _completion_events(
    handle: Handle, stop: tuple[str, ...], meta: _Meta, usage: bool, echo: str
) -> AsyncIterator[str]:
    head = meta.head("text_completion")

    def chunk(text: str, finish: str | None = None) -> str:
        return openai_event(
            {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        )

    if echo:
        yield chunk(echo)
    reply = _Reply(handle, stop)
    async for text, reason in reply.pieces():
        if reason is not None:
            yield chunk(text, _finish(reason))
        elif text:
            yield chunk(text)
    if reply.error:
        yield _stream_error(reply.error)
        yield DONE
        return
    if usage:
        yield openai_event({**head, "choices": [], "usage": _usage(meta.prompt_tokens, reply.tokens)})
    yield DONE
