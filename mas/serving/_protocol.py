"""The OpenAI wire format: request bodies, their checks, error bodies, messages to segments.

Every bad request becomes an HTTP 4xx with OpenAI's error body, naming the field::

    {"error": {"message": "messages[1].content: the user message is empty",
               "type": "invalid_request_error", "param": "messages[1].content", "code": null}}

Chat messages become torchtune ``Message`` objects and then segments through the one
:class:`mas.segments.SegmentBuilder`, exactly as in training: each system and user message is a
bidirectional segment, assistant messages are causal (a final assistant message is continued).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torchtune.data import Message

from mas.generation.logprobs import MAX_LOGPROBS

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "RequestError",
    "error_body",
    "parse_request",
    "prompt_messages_of",
    "token_prompts_of",
]

#: OpenAI role -> the builder's role (``developer`` is OpenAI's newer name for ``system``).
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
#: Fields of the OpenAI API this server does not implement: refused rather than ignored, unless
#: they hold the value that means "off" (clients send those defaults on every request).
_NEUTRAL: Dict[str, Tuple[Any, ...]] = {
    "suffix": (None, ""),
    "best_of": (None, 1),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
}


class RequestError(Exception):
    """A request the server refuses, with its HTTP status and the field at fault.

    Args:
        message (str): what is wrong and how to fix it.
        param (Optional[str]): the field (``messages[0].content``), or None.
        status (int): HTTP status (400 unless said otherwise).
        code (Optional[str]): OpenAI's error code (``model_not_found``, ``context_length_exceeded``).
        type (str): OpenAI's error type.
    """

    def __init__(self, message: str, param: Optional[str] = None, *, status: int = 400, code: Optional[str] = None, type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type


def error_body(message: str, *, param: Optional[str] = None, code: Optional[str] = None, type: str = "invalid_request_error") -> Dict[str, Any]:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Body(BaseModel):
    # Strict: "5" is not an int and "yes" is not a bool (a client bug should not pass silently).
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: Optional[int] = Field(None, ge=0)  # 0: only with echo / prompt_logprobs (checked in the plan)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=-1)
    stop: Any = None
    # torch generators take seeds in [-2**63, 2**64); choice j of a request uses seed + j.
    seed: Optional[int] = Field(None, ge=-(2**63), lt=2**64 - 64)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # Extensions (the openai client sends them with extra_body=...):
    attention: Optional[Literal["mas", "causal"]] = None  # only checked against the served mode
    return_token_ids: bool = False  # the generated ids in the response's "mas" section
    ignore_eos: bool = False  # the tokenizer's stop tokens do not end it (as vLLM's field: benchmarks)
    stop_token_ids: Optional[List[int]] = None  # more ids that end a choice (vLLM's field)
    min_tokens: int = Field(0, ge=0)  # tokens before a stop token may be chosen (vLLM's field)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)  # vLLM's field (1: off)
    prompt_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM's field: score the prompt's tokens

    def stop_strings(self) -> List[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise RequestError("stop: expected a string or a list of strings", "stop")
        if len(stops) > 4:
            raise RequestError(f"stop: at most 4 stop strings, got {len(stops)}", "stop")
        return [s for s in stops if s]


class ChatCompletionRequest(_Sampling):
    messages: List[Dict[str, Any]]
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)

    def generated_logprobs(self) -> Optional[int]:
        """Alternatives per generated token when log-probabilities are asked for, else None."""
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise RequestError("top_logprobs: needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: Any
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Optional[bool] = None

    def generated_logprobs(self) -> Optional[int]:
        """Alternatives per token when log-probabilities are asked for, else None."""
        return self.logprobs


def _param(loc: Tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_request(kind: type, data: Any) -> Any:
    """Validate a decoded JSON body as ``kind`` (a request model).

    Raises:
        RequestError: naming the first field at fault.
    """
    if not isinstance(data, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(data).__name__}")
    for key, neutral in _NEUTRAL.items():
        value = data.get(key)
        if not any(value == n and type(value) is type(n) for n in neutral):
            allowed = " or ".join(json.dumps(n) for n in neutral if n is not None)
            raise RequestError(f"{key}: not supported by this server (only {allowed}, its default, is accepted); got {json.dumps(value)}", key)
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = _param(first["loc"])
        message = "field required" if first["type"] == "missing" else first["msg"]
        raise RequestError(f"{param}: {message}", param) from None


def _text_of(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"{param}[{i}]: only text parts ({{'type': 'text', 'text': ...}}) are supported", f"{param}[{i}]")
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(f"{param}: expected a string or a list of text parts, got {type(content).__name__}", param)


def token_prompts_of(request: CompletionRequest) -> Optional[List[List[int]]]:
    """The prompts of a completion request given as token ids (``[1, 2]`` or ``[[1, 2], [3]]``,
    as lm-evaluation-harness sends them), or None when ``prompt`` is text.

    Raises:
        RequestError: an empty id list.
    """
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return [list(prompt)]
    if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        for i, ids in enumerate(prompt):
            if not ids or not all(type(t) is int for t in ids):
                raise RequestError(f"prompt[{i}]: expected a non-empty list of token ids", f"prompt[{i}]")
        return [list(p) for p in prompt]
    return None


def prompt_messages_of(request: Union[ChatCompletionRequest, CompletionRequest]) -> List[List[Message]]:
    """The prompts of a request as torchtune messages (one list per prompt).

    A chat request has one prompt; a completion request one per string of ``prompt`` (a plain
    string is one user message, as ``mas_generate`` reads a string prompt).

    Raises:
        RequestError: empty or malformed messages, unknown roles.
    """
    if isinstance(request, CompletionRequest):
        prompts = request.prompt if isinstance(request.prompt, list) else [request.prompt]
        if not prompts:
            raise RequestError("prompt: must not be empty", "prompt")
        out = []
        for i, p in enumerate(prompts):
            param = "prompt" if not isinstance(request.prompt, list) else f"prompt[{i}]"
            if not isinstance(p, str):
                raise RequestError(f"{param}: expected a string, a list of token ids or a list of strings", param)
            if not p.strip():
                raise RequestError(f"{param}: the prompt is empty", param)
            out.append([Message("user", p, masked=True)])
        return out
    if not request.messages:
        raise RequestError("messages: must contain at least one message", "messages")
    messages = []
    for i, m in enumerate(request.messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}]: expected an object with role and content, got {type(m).__name__}", f"messages[{i}]")
        role = m.get("role")
        if "role" not in m:
            raise RequestError(f"messages[{i}].role: field required", f"messages[{i}].role")
        if not isinstance(role, str) or role not in _ROLES:
            raise RequestError(
                f"messages[{i}].role: unknown role {role!r}; expected one of {sorted(_ROLES)}", f"messages[{i}].role"
            )
        if "content" not in m or m["content"] is None:
            raise RequestError(f"messages[{i}].content: field required", f"messages[{i}].content")
        text = _text_of(m["content"], f"messages[{i}].content")
        if not text.strip():
            raise RequestError(f"messages[{i}].content: the {role} message is empty", f"messages[{i}].content")
        messages.append(Message(_ROLES[role], text, masked=_ROLES[role] != "assistant"))
    return [messages]
