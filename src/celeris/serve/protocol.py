"""The OpenAI API's request bodies as Celeris serves them: validation, refusals, prompts, sampling.

Every problem is an `APIError`, which the app turns into OpenAI's error object
`{"error": {"message", "type", "param", "code"}}`: a body that is not JSON or asks for something Celeris
does not do (`tools`, `response_format`, `logprobs`, `n` > 1, an argument it does not know) → 400; a
value of the wrong type or out of range → 422; an unknown model → 404; a prompt over the context → 400.
Nothing is silently ignored except fields that cannot change the answer (`user`, `metadata`, ...).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from celeris.serve.worker import SamplingParams

MAX_STOP = 4  # stop strings per request (OpenAI's limit)


class APIError(Exception):
    """An HTTP error in OpenAI's layout."""

    TYPES = {401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error",
             500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # padding against side channels; nothing to pad on a loopback server


class _Body(BaseModel):
    """Fields both endpoints take. None = the default (OpenAI's: temperature 1, top_p 1)."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1)
    user: str | None = None


class ChatCompletionRequest(_Body):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]


# Fields that would change the answer in ways Celeris does not implement, with the values that mean "not used".
_UNSUPPORTED_COMMON = {"logprobs": (False,), "logit_bias": ({},), "frequency_penalty": (0,), "presence_penalty": (0,)}
UNSUPPORTED_CHAT = {**_UNSUPPORTED_COMMON, "tools": ([],), "tool_choice": ("none", "auto"), "functions": ([],),
                    "function_call": ("none", "auto"), "response_format": ({"type": "text"},), "top_logprobs": (0,),
                    "audio": (), "modalities": (["text"],), "prediction": (), "web_search_options": (),
                    "reasoning_effort": (), "verbosity": ()}
UNSUPPORTED_COMPLETION = {**_UNSUPPORTED_COMMON, "echo": (False,), "suffix": ("",), "best_of": (1,)}
# Fields that cannot change the answer: accepted and not used.
HARMLESS = {"metadata", "service_tier", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
            "parallel_tool_calls", "store"}


def parse_body(data: Any, kind: type[_Body]) -> _Body:
    """Validate a decoded JSON body: 422 for a wrong type or value, 400 for what Celeris does not support."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        body = kind.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or None
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise APIError(422, f"{where}: {err['msg']}{more}" if where else err["msg"] + more, where, "invalid_value") from None
    unsupported = UNSUPPORTED_CHAT if kind is ChatCompletionRequest else UNSUPPORTED_COMPLETION
    for key, value in (body.model_extra or {}).items():
        if key in unsupported:
            if value is not None and value not in unsupported[key]:
                raise APIError(400, f"Celeris does not support '{key}' (got {value!r}); leave it out", key, "unsupported_parameter")
        elif key == "store" and value:
            raise APIError(400, "Celeris does not store completions ('store': true); leave it out", key, "unsupported_parameter")
        elif key not in HARMLESS:
            raise APIError(400, f"Unrecognized request argument supplied: {key}", key, "unknown_parameter")
    if (body.n or 1) > 1:
        raise APIError(400, f"Celeris answers one choice per request (n = 1), got n = {body.n}", "n", "unsupported_parameter")
    return body


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise APIError(400, f"at most {MAX_STOP} stop strings, got {len(stops)}", "stop", "invalid_value")
    if any(not s for s in stops):
        raise APIError(400, "stop strings must not be empty", "stop", "invalid_value")
    return tuple(stops)


def chat_prompt_ids(tokenizer, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template, ready for the assistant's turn
    (as `celeris.generation.encode_prompt` builds them for one user message)."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
    msgs = []
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        role, content = m.get("role"), m.get("content")
        if role in ("tool", "function") or m.get("tool_calls") or m.get("function_call"):
            raise APIError(400, f"{where}: Celeris does not support tools or function calls", where, "unsupported_parameter")
        if role not in ("system", "developer", "user", "assistant"):
            raise APIError(422, f"{where}.role must be 'system', 'developer', 'user' or 'assistant', got {role!r}", f"{where}.role")
        if isinstance(content, list):  # content parts: text only
            if any(not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
                raise APIError(400, f"{where}.content: Celeris takes text parts only", f"{where}.content", "unsupported_parameter")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(422, f"{where}.content must be a string or a list of text parts", f"{where}.content")
        msgs.append({"role": "system" if role == "developer" else role, "content": content})
    try:
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # a template's own refusal (e.g. roles that must alternate)
        raise APIError(400, f"the chat template refused these messages: {exc}", "messages") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def completion_prompt_ids(tokenizer, prompt: str | list, vocab_size: int) -> list[int]:
    """Token ids of a completion prompt: a string (tokenised with the tokenizer's special tokens, as
    `celeris generate --no-chat` does) or token ids; one prompt per request."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise APIError(400, f"Celeris answers one prompt per request, got {len(prompt)}", "prompt", "unsupported_parameter")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "the prompt is empty", "prompt")
        return tokenizer(prompt)["input_ids"]
    if not prompt:
        raise APIError(400, "the prompt is empty", "prompt")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise APIError(400, f"token ids must be in 0..{vocab_size - 1}, got {bad[0]}", "prompt", "invalid_value")
    return list(prompt)


def sampling_params(body: _Body, prompt_tokens: int, max_context: int, greedy_only: bool = False) -> SamplingParams:
    """The request's sampling, checked against the context and the decoder. `greedy_only` (a server with a
    memory policy): an omitted temperature means 0, a positive one is refused."""
    asked = getattr(body, "max_completion_tokens", None)
    if asked is not None and body.max_tokens is not None and asked != body.max_tokens:
        raise APIError(400, "max_tokens and max_completion_tokens differ; send one", "max_completion_tokens")
    asked = asked if asked is not None else body.max_tokens
    room = max_context - prompt_tokens
    if room < 1 or (asked is not None and asked > room):
        raise APIError(400, f"This model's maximum context length is {max_context} tokens. However, you requested "
                            f"{prompt_tokens + (asked or 1)} tokens ({prompt_tokens} in the prompt, {asked or 1} for the "
                            "completion). Please reduce the prompt or the completion length.",
                       "messages" if isinstance(body, ChatCompletionRequest) else "prompt", "context_length_exceeded")
    if greedy_only and body.temperature:
        raise APIError(400, "this server decodes greedily (it was started with a KV-memory policy, --memory): send "
                            "temperature 0 or leave it out", "temperature", "unsupported_parameter")
    temperature = (0.0 if greedy_only else 1.0) if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    return SamplingParams(max_tokens=asked or room, temperature=temperature, top_p=top_p, seed=body.seed,
                          stop=stop_strings(body.stop))
