"""Text-Generation-Inference wire format: `POST /`, `/generate`, `/generate_stream`, `GET /info`.

`POST /` is what `text_generation.Client` and `InferenceClient.text_generation` call: it streams
when the body says `"stream": true`, else answers a one-element list. The prompt is raw text (no
chat template), as in TGI. The reply keeps a stop string that ended it, as TGI's does.
`parameters.grammar` (`json` schema or `regex`) constrains the reply as OpenAI's `response_format`
does (`constraints.py`); a grammar that cannot compile is a 422 `validation` error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import torch
from fastapi import APIRouter, Request

from torus_plugins import __version__

from .constraints import Constraint
from .errors import ApiError, bad_request, error_docs, tgi_body
from .generation import CANCELLED, ERROR, Completion, GenerationRequest, Handle
from .request_model import body_doc, parse
from .sampling import SamplingParams
from .service import ModelService, failure, stop_strings
from .sse import EventStream, stream_docs, tgi_event
from .tgi_schemas import GenerateRequest, GenerateResponse, Info, Parameters, StreamResponse


def _sampling(p: Parameters) -> SamplingParams:
    # TGI samples when asked to, or when any sampling knob is set.
    sample = bool(p.do_sample) or p.temperature not in (None, 1.0) or p.top_p is not None or p.top_k is not None
    return SamplingParams(
        temperature=(p.temperature or 1.0) if sample else 0.0,
        top_p=p.top_p or 1.0,
        top_k=p.top_k or 0,
        seed=p.seed,
        repetition_penalty=p.repetition_penalty or 1.0,
        frequency_penalty=p.frequency_penalty or 0.0,
    )


@dataclass
class _Prepared:
    """A request parsed, tokenized and checked (in a worker thread), ready to start."""

    body: GenerateRequest
    params: Parameters
    gen: GenerationRequest
    prefill: list[dict[str, Any]] = field(default_factory=list)  # decoder_input_details


def _prepare(service: ModelService, raw: bytes) -> _Prepared:
    body = parse(GenerateRequest, raw)
    p = body.parameters or Parameters()
    prompt = service.encode_text(body.inputs, "inputs")
    if p.truncate is not None:
        prompt = prompt[-p.truncate :]
    gen = GenerationRequest(
        tuple(prompt),
        service.max_new_tokens(len(prompt), p.max_new_tokens, "max_new_tokens", prompt_param="inputs"),
        _sampling(p),
        stop_strings(p.stop, "parameters.stop"),
        constraint=_constraint(service, p),
    )
    ready = _Prepared(body, p, gen)
    if p.details and p.decoder_input_details:
        decode = service.tm.tokenizer.decode
        ready.prefill = [{"id": i, "text": decode([i]), "logprob": None} for i in prompt]
    return ready


def _constraint(service: ModelService, p: Parameters) -> Constraint | None:
    """TGI's `grammar` through the same constrained decoding as OpenAI's `response_format`."""
    if p.grammar is None:
        return None
    value, param = p.grammar.value, "parameters.grammar.value"
    if p.grammar.type == "regex":
        if not isinstance(value, str):
            raise bad_request(f"{param} must be a regular expression (a string) for type regex", param)
        return service.grammars.start(service.grammars.regex(value, param))
    if isinstance(value, str):  # TGI accepts the schema as JSON text too
        try:
            value = json.loads(value)
        except ValueError:
            raise bad_request(f"{param} must be a JSON Schema (an object, or its JSON text)", param) from None
    return service.grammars.start(service.grammars.json_schema(value, param))


def _token(t: Any) -> dict[str, Any]:
    return {"id": t.id, "text": t.text, "logprob": t.logprob, "special": t.special}


def _response(ready: _Prepared, done: Completion) -> dict[str, Any]:
    p = ready.params
    out: dict[str, Any] = {"generated_text": (ready.body.inputs if p.return_full_text else "") + done.text}
    if p.details:
        out["details"] = {
            "finish_reason": done.finish_reason,
            "generated_tokens": len(done.tokens),
            "seed": done.seed,
            "prefill": ready.prefill,
            "tokens": [_token(t) for t in done.tokens],
            "top_tokens": None,
            "best_of_sequences": None,
        }
    return out


def build_router(service: ModelService) -> APIRouter:
    router = APIRouter(tags=["Text Generation Inference"])
    errors_doc = error_docs(openai=False)

    async def prepare(request: Request) -> _Prepared:
        return await service.prepare(request, lambda raw: _prepare(service, raw))

    async def generate_once(ready: _Prepared, request: Request) -> dict[str, Any]:
        handle = service.start(ready.gen)
        done = await service.complete(handle, request)
        return _response(ready, done)

    def stream(ready: _Prepared) -> EventStream:
        handle = service.start(ready.gen)
        prefix = ready.body.inputs if ready.params.return_full_text else ""
        return EventStream(_tgi_events(handle, prefix, bool(ready.params.details), len(ready.gen.prompt_ids)), handle)

    @router.post(
        "/",
        response_model=list[GenerateResponse],
        responses={**stream_docs(StreamResponse, "A one-element list; with `stream`, token events"), **errors_doc},
        openapi_extra=body_doc(GenerateRequest),
        summary="Generate (TGI compat route: streams when `stream` is true)",
    )
    async def compat(request: Request):
        ready = await prepare(request)
        if ready.body.stream:
            return stream(ready)
        return [await generate_once(ready, request)]

    @router.post(
        "/generate",
        response_model=GenerateResponse,
        responses=errors_doc,
        openapi_extra=body_doc(GenerateRequest),
        summary="Generate (TGI)",
    )
    async def generate(request: Request):
        return await generate_once(await prepare(request), request)

    @router.post(
        "/generate_stream",
        response_class=EventStream,
        status_code=200,
        responses={**stream_docs(StreamResponse, "Token events; the last holds `generated_text`"), **errors_doc},
        openapi_extra=body_doc(GenerateRequest),
        summary="Generate, streaming tokens (TGI)",
    )
    async def generate_stream(request: Request):
        return stream(await prepare(request))

    @router.get("/info", response_model=Info, responses=errors_doc, summary="Model and server limits (TGI)")
    async def info():
        model = service.tm.model
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        return {
            "model_id": service.model_name,
            "model_sha": None,
            "model_dtype": dtype,
            "model_device_type": torch.device(service.scheduler.device).type,
            "max_concurrent_requests": service.settings.max_pending,
            "max_input_tokens": service.max_input_tokens,
            "max_total_tokens": service.max_total_tokens,
            "max_batch_size": service.scheduler.max_batch_size,
            "version": __version__,
        }

    return router


async def _tgi_events(handle: Handle, prefix: str, details: bool, input_length: int) -> AsyncIterator[str]:
    text, index = "", 0
    async for step in handle.steps():
        if step.finish_reason in (CANCELLED, ERROR):
            err = failure(step) if step.finish_reason == ERROR else ApiError(500, "generation was cancelled")
            yield tgi_event(tgi_body(err.message, err.tgi_type))  # `text_generation` raises it, typed
            return
        assert step.token is not None
        index += 1
        text += step.token.reply_text
        event: dict[str, Any] = {
            "index": index,
            "token": _token(step.token),
            "top_tokens": None,
            "generated_text": None,
            "details": None,
        }
        if step.finish_reason is not None:
            event["generated_text"] = prefix + text
            if details:
                event["details"] = {
                    "finish_reason": step.finish_reason,
                    "generated_tokens": index,
                    "seed": handle.request.sampling.seed,
                    "input_length": input_length,
                }
        yield tgi_event(event)
