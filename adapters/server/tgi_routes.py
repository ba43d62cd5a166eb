"""Text-Generation-Inference wire format: `POST /`, `/generate`, `/generate_stream`, `GET /info`.

`POST /` is what `text_generation.Client` and `InferenceClient.text_generation` call: it streams
when the body says `"stream": true`, else answers a one-element list. The prompt is raw text (no
chat template), as in TGI. The reply keeps a stop string that ended it, as TGI's does.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import torch
from fastapi import APIRouter, Request

from torus_plugins import __version__

from .errors import error_docs, tgi_body
from .generation import CANCELLED, ERROR, Completion, GenerationRequest, Handle
from .sampling import SamplingParams
from .service import ModelService, stop_strings
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


def _prepare(service: ModelService, body: GenerateRequest) -> tuple[GenerationRequest, Parameters]:
    p = body.parameters or Parameters()
    prompt = service.encode_text(body.inputs, "inputs")
    if p.truncate is not None:
        prompt = prompt[-p.truncate :]
    gen = GenerationRequest(
        tuple(prompt),
        service.max_new_tokens(len(prompt), p.max_new_tokens, "max_new_tokens"),
        _sampling(p),
        stop_strings(p.stop, "parameters.stop"),
    )
    return gen, p


def _token(t: Any) -> dict[str, Any]:
    return {"id": t.id, "text": t.text, "logprob": t.logprob, "special": t.special}


def _response(
    service: ModelService, body: GenerateRequest, p: Parameters, done: Completion, prompt_ids: tuple[int, ...]
) -> dict[str, Any]:
    out: dict[str, Any] = {"generated_text": (body.inputs if p.return_full_text else "") + done.text}
    if p.details:
        decode = service.tm.tokenizer.decode
        prefill = (
            [{"id": i, "text": decode([i]), "logprob": None} for i in prompt_ids] if p.decoder_input_details else []
        )
        out["details"] = {
            "finish_reason": done.finish_reason,
            "generated_tokens": len(done.tokens),
            "seed": done.seed,
            "prefill": prefill,
            "tokens": [_token(t) for t in done.tokens],
            "top_tokens": None,
            "best_of_sequences": None,
        }
    return out


def build_router(service: ModelService) -> APIRouter:
    router = APIRouter(tags=["Text Generation Inference"])
    errors_doc = error_docs(openai=False)

    async def generate_once(body: GenerateRequest, request: Request) -> dict[str, Any]:
        gen, p = _prepare(service, body)
        handle = service.start(gen)
        done = await service.complete(handle, request)
        return _response(service, body, p, done, gen.prompt_ids)

    def stream(body: GenerateRequest) -> EventStream:
        gen, p = _prepare(service, body)
        handle = service.start(gen)
        prefix = body.inputs if p.return_full_text else ""
        return EventStream(_tgi_events(handle, prefix, bool(p.details), len(gen.prompt_ids)), handle)

    @router.post(
        "/",
        response_model=list[GenerateResponse],
        responses={**stream_docs(StreamResponse, "A one-element list; with `stream`, token events"), **errors_doc},
        summary="Generate (TGI compat route: streams when `stream` is true)",
    )
    async def compat(body: GenerateRequest, request: Request):
        if body.stream:
            return stream(body)
        return [await generate_once(body, request)]

    @router.post("/generate", response_model=GenerateResponse, responses=errors_doc, summary="Generate (TGI)")
    async def generate(body: GenerateRequest, request: Request):
        return await generate_once(body, request)

    @router.post(
        "/generate_stream",
        response_class=EventStream,
        status_code=200,
        responses={**stream_docs(StreamResponse, "Token events; the last holds `generated_text`"), **errors_doc},
        summary="Generate, streaming tokens (TGI)",
    )
    async def generate_stream(body: GenerateRequest):
        return stream(body)

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
            "max_input_tokens": service.context_length - 1,
            "max_total_tokens": service.context_length,
            "max_batch_size": service.scheduler.max_batch_size,
            "version": __version__,
        }

    return router


async def _tgi_events(handle: Handle, prefix: str, details: bool, input_length: int) -> AsyncIterator[str]:
    text, index = "", 0
    async for step in handle.steps():
        if step.finish_reason in (CANCELLED, ERROR):
            yield tgi_event(tgi_body(step.error or "generation was cancelled", "generation"))
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
