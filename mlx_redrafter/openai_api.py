"""OpenAI's wire format for `mlx-redrafter serve`: requests checked into a `Completion`, responses and
stream chunks built to OpenAI's schema, errors as OpenAI's error JSON.

Every field is checked before any work; what the engine cannot honour exactly (tools, logprobs,
penalties, several choices) is refused with a 400 saying so rather than ignored. No field names a
file: a request carries text or token ids, never a path the server would read.
"""

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from numbers import Real
from typing import List, Optional

from .generate import chat_text, context_window, encode_messages, encode_prompt, fit_context, lone_surrogate, surely_over
from .sampling import SamplingConfig

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
SEED_MAX = 2**64 - 1
MAX_STOPS = 16
NO_WINDOW_MAX_TOKENS = 1 << 20  # the cap on max_tokens where a model declares no context window


class ApiError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Served:
    """The model a server answers for: its id (as /v1/models lists it) and the names it also accepts."""

    id: str
    model: object
    tokenizer: object
    default_max_tokens: int = 512
    defaults: SamplingConfig = field(default_factory=SamplingConfig)
    aliases: tuple = ()
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def named(cls, model_arg: Optional[str], **kwargs) -> "Served":
        """Served under the --model value as given (the default model: its file's name without .gguf),
        also answering to its file name and full path."""
        from pathlib import Path

        if model_arg is None:
            from .loading import default_model_path

            path = default_model_path()
            return cls(id=path.name.removesuffix(".gguf"), aliases=(path.name, str(path)), **kwargs)
        path = Path(model_arg).expanduser()
        aliases = {path.name, path.name.removesuffix(".gguf")}
        if path.exists():
            aliases.add(str(path.resolve()))
        return cls(id=model_arg, aliases=tuple(sorted(aliases)), **kwargs)

    def names(self) -> set:
        return {self.id, *self.aliases}

    def listing(self) -> dict:
        return {"object": "list", "data": [{"id": self.id, "object": "model", "created": self.created,
                                            "owned_by": "mlx-redrafter"}]}


@dataclass
class Completion:
    """A checked request: the prompt's token ids and how to answer."""

    chat: bool
    ids: List[int]
    max_tokens: int
    sampling: SamplingConfig
    stop: List[str]
    stream: bool
    include_usage: bool


def parse_request(raw: bytes, chat: bool, served: Served) -> Completion:
    """A request body -> Completion, or ApiError naming the field at fault."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}): send a JSON object")
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON here: it nests too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    check_model(body.get("model"), served)
    refuse_unsupported(body, chat)
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, None)
    if options is not None and not stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")
    include_usage = bool(options and _typed(options, "include_usage", bool, False, "stream_options.include_usage"))
    limit = context_window(served.model)
    max_tokens = _max_tokens(body, served.default_max_tokens, limit)
    ids = _chat_ids(body, served.tokenizer, limit) if chat else _prompt_ids(body, served, limit)
    try:
        ids, max_tokens = fit_context(ids, max_tokens, limit)
    except ValueError:
        raise ApiError(400, f"the prompt is {len(ids)} tokens and the model's context window is {limit} tokens "
                            f"(prompt and reply together): shorten it", "messages" if chat else "prompt",
                       "context_length_exceeded")
    return Completion(chat, ids, max_tokens, _sampling(body, served.defaults), _stops(body), stream, include_usage)


def check_model(name, served: Served):
    if name is None:
        return
    if not isinstance(name, str):
        raise ApiError(400, f"model must be a string, got {type(name).__name__}", "model")
    if name not in served.names():
        raise ApiError(404, f"The model `{name}` does not exist: this server serves `{served.id}` (GET /v1/models)",
                       "model", "model_not_found")


# fields whose every value but these means something the engine cannot do exactly
_NEUTRAL = {"n": (1,), "best_of": (1,), "logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,),
            "frequency_penalty": (0,), "presence_penalty": (0,), "repetition_penalty": (1, 0),
            "min_p": (0,), "logit_bias": ({},), "tools": ([],), "functions": ([],), "tool_choice": ("none",),
            "function_call": ("none",), "suffix": ("",), "parallel_tool_calls": (False, True)}
_WHY = {"logprobs": "log probabilities are not available: the speculative engine does not return them",
        "top_logprobs": "log probabilities are not available: the speculative engine does not return them",
        "tools": "tool calling is not supported", "functions": "function calling is not supported",
        "tool_choice": "tool calling is not supported", "function_call": "function calling is not supported",
        "n": "only one choice per request is supported (n = 1)", "best_of": "best_of is not supported",
        "echo": "echo is not supported", "suffix": "suffix (insertion) is not supported",
        "logit_bias": "logit_bias is not supported: it would change the distribution the drafter is verified against"}


def refuse_unsupported(body: dict, chat: bool):
    for name, neutral in _NEUTRAL.items():
        value = body.get(name)
        if value is not None and not any(value == v and type(value) is type(v) or _same_number(value, v)
                                         for v in neutral):
            why = _WHY.get(name, f"{name} is not supported (only exact sampling: temperature, top_p, top_k)")
            raise ApiError(400, f"{why}: leave {name} out", name, "unsupported_parameter")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise ApiError(400, "response_format other than {\"type\": \"text\"} (JSON mode, JSON schema) is not "
                            "supported: leave it out", "response_format", "unsupported_parameter")


def _same_number(value, neutral) -> bool:
    return (isinstance(value, Real) and not isinstance(value, bool) and isinstance(neutral, Real)
            and not isinstance(neutral, bool) and value == neutral)


def _typed(body: dict, name: str, kind, default, param: Optional[str] = None):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ApiError(400, f"{param or name} must be {_KIND_NAMES[kind]}, got {json.dumps(value)[:80]}", param or name)
    return value


_KIND_NAMES = {bool: "true or false", dict: "an object", str: "a string", list: "an array", int: "an integer"}


def _number(body: dict, name: str, default, low, high, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ApiError(400, f"{name} must be a number, got {json.dumps(value)[:80]}", name)
    if value < low or (low_open and value == low) or (high is not None and value > high):
        span = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}{']' if high is not None else ')'}"
        raise ApiError(400, f"{name} must be in {span}, got {value}", name)
    return value


def _integer(body: dict, name: str, default, low: int, high: int):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer, got {json.dumps(value)[:80]}", name)
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low} and {high}, got {value}", name)
    return value


def _max_tokens(body: dict, default: int, limit: Optional[int]) -> int:
    """max_completion_tokens, else max_tokens (each checked when sent)."""
    values = [_integer(body, name, None, 1, limit or NO_WINDOW_MAX_TOKENS)
              for name in ("max_completion_tokens", "max_tokens")]
    return next((v for v in values if v is not None), min(default, limit or default))


def _sampling(body: dict, defaults: SamplingConfig) -> SamplingConfig:
    return SamplingConfig(
        temperature=float(_number(body, "temperature", defaults.temperature, 0, None)),
        top_p=float(_number(body, "top_p", defaults.top_p, 0, 1, low_open=True)),
        top_k=_integer(body, "top_k", defaults.top_k, 0, 1 << 31),
        seed=_integer(body, "seed", defaults.seed, 0, SEED_MAX),
    )


def _stops(body: dict) -> List[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOPS} non-empty strings", "stop")
    return stops


def _chat_ids(body: dict, tokenizer, limit: Optional[int]) -> List[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty array of {\"role\", \"content\"} objects", "messages")
    chat = [_message(m, i) for i, m in enumerate(messages)]
    try:
        text = chat_text(tokenizer, chat)
    except Exception as e:  # the chat template (Jinja) may refuse an order of roles
        raise ApiError(400, f"the model's chat template refused these messages: {str(e).splitlines()[0][:200]}",
                       "messages")
    _refuse_surely_over(tokenizer, text, limit, "messages")
    return encode_messages(tokenizer, chat)


def _refuse_surely_over(tokenizer, text: str, limit: Optional[int], param: str):
    if surely_over(tokenizer, text, limit):
        raise ApiError(400, f"the prompt is over {limit} tokens, the model's context window (prompt and reply "
                            "together): shorten it", param, "context_length_exceeded")


def _message(m, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise ApiError(400, f"{where} must be an object with role and content", where)
    role = m.get("role")
    if role not in ROLES:
        raise ApiError(400, f"{where}.role must be one of system, user, assistant (developer = system), "
                            f"got {json.dumps(role)[:40]}", f"{where}.role")
    return {"role": ROLES[role], "content": _content(m.get("content"), f"{where}.content")}


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return _unicode(content, where)
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return _unicode("".join(p["text"] for p in content), where)
    raise ApiError(400, f"{where} must be a string or an array of text parts ({{\"type\": \"text\", \"text\": ...}}; "
                        "images and audio are not supported)", where)


def _prompt_ids(body: dict, served: Served, limit: Optional[int]) -> List[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    vocab = getattr(getattr(served.model, "args", None), "vocab_size", None)
    if isinstance(prompt, str) and prompt:
        _refuse_surely_over(served.tokenizer, _unicode(prompt, "prompt"), limit, "prompt")
        return encode_prompt(served.tokenizer, prompt, chat_template=False)
    if (isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                    and (vocab is None or t < vocab) for t in prompt)):
        return list(prompt)
    raise ApiError(400, "prompt must be a non-empty string or a non-empty array of token ids"
                        + (f" below {vocab}" if vocab else "") + " (one prompt per request)", "prompt")


def _unicode(text: str, where: str) -> str:
    """JSON's \\ud800-style escapes can carry half of a surrogate pair, which no tokenizer encodes."""
    lone = lone_surrogate(text)
    if lone is not None:
        raise ApiError(400, f"{where} holds a lone UTF-16 surrogate ({ascii(lone)}): send valid Unicode (both "
                            "halves of a pair, or the character itself)", where)
    return text


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class Reply:
    """Builds one request's response objects (the whole answer, or the stream's chunks)."""

    def __init__(self, req: Completion, model_id: str):
        self.chat, self.model_id, self.include_usage = req.chat, model_id, req.include_usage
        self.id, self.created = new_id(req.chat), int(time.time())

    def _head(self, chunk: bool) -> dict:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id,
                "system_fingerprint": None}

    def whole(self, text: str, finish: str, used: dict, speculative: dict) -> dict:
        choice = {"index": 0, "logprobs": None, "finish_reason": finish}
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        return {**self._head(False), "choices": [choice], "usage": used, "speculative": speculative}

    def chunk(self, text: Optional[str] = None, finish: Optional[str] = None, role: bool = False,
              speculative: Optional[dict] = None) -> dict:
        choice = {"index": 0, "logprobs": None, "finish_reason": finish}
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        out = {**self._head(True), "choices": [choice]}
        if self.include_usage:
            out["usage"] = None  # OpenAI: null on every chunk but the last
        if speculative is not None:
            out["speculative"] = speculative
        return out

    def usage_chunk(self, used: dict) -> dict:
        return {**self._head(True), "choices": [], "usage": used}
