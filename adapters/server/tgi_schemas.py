"""Request and response bodies of the Text-Generation-Inference routes (TGI's names and limits).

As in TGI, setting temperature, top_p or top_k turns sampling on even without `do_sample`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from .request_model import RequestModel

TGIFinishReason = Literal["length", "eos_token", "stop_sequence"]


class GrammarSpec(RequestModel):
    """TGI's `grammar`: `{"type": "json", "value": <JSON Schema>}` or `{"type": "regex", "value": "<pattern>"}`."""

    type: Literal["json", "regex"]
    value: Any


class Parameters(RequestModel):
    do_sample: bool | None = False
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, gt=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, lt=1.0)
    top_k: int | None = Field(None, gt=0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stop: Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    truncate: int | None = Field(None, ge=1, description="Keep only the last `truncate` prompt tokens.")
    return_full_text: bool | None = False
    details: bool | None = False
    decoder_input_details: bool | None = False
    best_of: int | None = Field(None, ge=1, le=1, description="Only 1 is supported.")
    typical_p: None = Field(None, description="Not supported.")
    watermark: bool | None = False
    top_n_tokens: int | None = Field(None, ge=0, le=0, description="Not supported: only 0.")
    grammar: GrammarSpec | None = Field(None, description="Constrain the reply: a JSON schema or a regular expression.")
    adapter_id: None = Field(None, description="Not supported.")


class GenerateRequest(RequestModel):
    inputs: str = Field(min_length=1)
    parameters: Parameters | None = None
    stream: bool | None = Field(False, description="Only for `POST /`: stream server-sent events.")


class InputToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool


class Details(BaseModel):
    finish_reason: TGIFinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[InputToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None
    best_of_sequences: list[Any] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: TGIFinishReason
    generated_tokens: int
    seed: int | None = None
    input_length: int


class StreamResponse(BaseModel):
    """One `data:` event of a token stream; the last carries `generated_text` and `details`."""

    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


class Info(BaseModel):
    model_id: str
    model_sha: str | None = None
    model_dtype: str
    model_device_type: str
    model_pipeline_tag: str | None = "text-generation"
    max_concurrent_requests: int
    max_best_of: int = 1
    max_stop_sequences: int = 4
    max_input_tokens: int
    max_total_tokens: int
    max_batch_size: int | None = None
    validation_workers: int = 1
    max_client_batch_size: int = 1
    router: str = "torus-sparse"
    version: str
    sha: str | None = None
    docker_label: str | None = None
