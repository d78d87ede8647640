"""Request schemas of the OpenAI-compatible API (pydantic), with OpenAI's parameter names and bounds.

Unknown fields are ignored (as most OpenAI-compatible servers do), so clients that send newer
parameters keep working; parameters we recognise but cannot honour are refused with a 400 naming them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP_SEQUENCES = 16

StopParam = (
    Annotated[str, Field(min_length=1)]
    | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_SEQUENCES)]
)
TokenId = Annotated[int, Field(ge=0)]


class StreamOptions(BaseModel):
    """stream_options: include_usage adds a final chunk with the token counts."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = False


class _SamplingFields(BaseModel):
    """Sampling parameters shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=512)
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = 1
    stop: StopParam | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extensions (vLLM's names).
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    # Bounded away from 0: a penalty of 1e-300 turns logits into infinities.
    repetition_penalty: Annotated[float, Field(ge=0.01, le=10.0)] | None = None
    ignore_eos: bool | None = False
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: (
        Annotated[str, Field(max_length=1_000_000)]
        | Annotated[list[Annotated[str, Field(max_length=1_000_000)]], Field(min_length=1, max_length=64)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=64)]
    )
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool | None = False
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    suffix: str | None = None


class TextContentPart(BaseModel):
    """A text part of a message's content list."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class OtherContentPart(BaseModel):
    """A non-text part (image, audio, ...): accepted by the schema, refused with a 400 naming it."""

    model_config = ConfigDict(extra="allow")
    type: str


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart | OtherContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    functions: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool | None = True
