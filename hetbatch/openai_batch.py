"""OpenAI batch requests in, OpenAI batch output lines out.

A request line is `{"custom_id", "method", "url", "body"}` for `/v1/chat/completions` or
`/v1/completions`. Its body's model-independent fields (messages or prompt, max_tokens,
temperature, top_p, stop, seed, n, logprobs, response_format, ...) become that row's own
sampling on top of the job's; `model` is ignored (the job runs one model). A line that is not
such a request is that row's error, naming the file and line.

Output lines follow the hosted Batch API's layout: `id`, `custom_id`, `response` with
`status_code`, `request_id` and a `chat.completion` or `text_completion` `body` (`choices`,
`usage`), and `error`. A failed row gets status 400, an OpenAI error body, and `error`.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from hetbatch.prompts import checked_schema

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
OBJECTS = {CHAT: "chat.completion", COMPLETIONS: "text_completion"}
ID_PREFIXES = {CHAT: "chatcmpl-", COMPLETIONS: "cmpl-"}

# Body fields passed to vLLM's SamplingParams under the same name.
PASSED = (
    "temperature", "top_p", "stop", "seed", "n", "presence_penalty", "frequency_penalty",
    "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
    "skip_special_tokens", "include_stop_str_in_output",
)
REFUSED = ("tools", "functions", "tool_choice", "suffix")


class RequestError(Exception):
    """The line is not a request hetbatch can run; the message names the problem."""


def parse_request(line: str) -> tuple[str, str, Any, dict[str, Any]]:
    """(custom_id, url, messages or prompt text, sampling) of one request line."""
    try:
        request = json.loads(line)
    except ValueError as exc:
        raise RequestError(f"not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise RequestError("a request line must be a JSON object")
    cid = request.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise RequestError("custom_id must be a non-empty string")
    method, url, body = request.get("method", "POST"), request.get("url"), request.get("body")
    if method != "POST":
        raise RequestError(f"method must be POST, not {method!r}")
    if url not in OBJECTS:
        raise RequestError(f"url {url!r} is not supported (only {CHAT} and {COMPLETIONS})")
    if not isinstance(body, dict):
        raise RequestError("body must be a JSON object")
    for name in REFUSED:
        if body.get(name):
            raise RequestError(f"body.{name} is not supported")
    if body.get("stream"):
        raise RequestError("body.stream must not be true in a batch")
    return cid, url, _prompt(url, body), body_sampling(url, body)


def _prompt(url: str, body: dict[str, Any]) -> Any:
    if url == CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("body.messages must be a non-empty list")
        try:
            return [{"role": m["role"], "content": _content(m["content"])} for m in messages]
        except (KeyError, TypeError) as exc:
            raise RequestError(f"body.messages must be {{role, content}} objects: {exc}") from None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError("body.prompt must be one string")
    if not prompt.strip():
        raise RequestError("body.prompt is empty")
    return prompt


def _content(content: Any) -> str:
    """Message content as text: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" for p in content
    ):
        return "".join(str(p.get("text", "")) for p in content)
    raise TypeError("content must be text or a list of text parts")


def body_sampling(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """The body's sampling fields as vLLM SamplingParams fields; vLLM checks their values."""
    own = {k: body[k] for k in PASSED if body.get(k) is not None}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        own["max_tokens"] = max_tokens
    if url == CHAT:
        if body.get("logprobs"):
            own["logprobs"] = body.get("top_logprobs") or 0
    elif body.get("logprobs") is not None:
        own["logprobs"] = body["logprobs"]
    constraint = _response_format(body.get("response_format"))
    if constraint is not None:
        own["structured_outputs"] = constraint
    return own


def _response_format(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json": {"type": "object"}}
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        schema = {} if schema is None else schema
        try:
            text = schema if isinstance(schema, str) else json.dumps(schema)
            return {"json": checked_schema(text)}
        except ValueError as exc:
            raise RequestError(f"body.response_format: {exc}") from None
    raise RequestError(
        "body.response_format.type must be text, json_object or json_schema, "
        f"not {kind!r}"
    )


# -- output -----------------------------------------------------------------------------------


def _stable_id(*parts: Any) -> str:
    return hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=12).hexdigest()


def output_line(
    custom_id: str | None,
    url: str,
    model: str,
    result: dict[str, Any],
    row: int,
    created: int | None = None,
) -> dict[str, Any]:
    """One row's line in OpenAI's batch output layout (ids stable per row and custom_id)."""
    key = _stable_id(custom_id, row)
    line: dict[str, Any] = {"id": f"batch_req_{key}", "custom_id": custom_id}
    error = result.get("error")
    if error is not None:
        body = {"error": {"message": error, "type": "invalid_request_error", "param": None,
                          "code": None}}
        line["response"] = {"status_code": 400, "request_id": f"req_{key}", "body": body}
        line["error"] = {"code": "invalid_request", "message": error}
        return line
    choices = [
        _choice(url, i, s, result.get("constrained"))
        for i, s in enumerate(result["samples"])
    ]
    prompt_tokens, completion_tokens = result["prompt_tokens"], result["completion_tokens"]
    body = {
        "id": f"{ID_PREFIXES[url]}{key}",
        "object": OBJECTS[url],
        "created": int(created if created is not None else time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
    line["response"] = {"status_code": 200, "request_id": f"req_{key}", "body": body}
    line["error"] = None
    return line


def _choice(url: str, index: int, sample: dict[str, Any], constrained: Any) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index}
    logprobs = _logprobs(url, sample)
    if url == CHAT:
        choice["message"] = {"role": "assistant", "content": sample["text"]}
    else:
        choice["text"] = sample["text"]
    choice["logprobs"] = logprobs
    choice["finish_reason"] = sample["finish_reason"]
    if constrained is not None:
        choice["structured_error"] = sample.get("structured_error")
    return choice


def _logprobs(url: str, sample: dict[str, Any]) -> dict[str, Any] | None:
    chosen, top, tokens = sample.get("token_logprobs"), sample.get("top_logprobs"), sample.get(
        "tokens"
    )
    if chosen is None:
        return None
    tokens = tokens or [""] * len(chosen)
    top = top or [[] for _ in chosen]
    if url == CHAT:
        return {
            "content": [
                {
                    "token": t,
                    "logprob": lp,
                    "bytes": list(t.encode()),
                    "top_logprobs": [
                        {"token": c["token"], "logprob": c["logprob"],
                         "bytes": list(c["token"].encode())}
                        for c in at
                    ],
                }
                for t, lp, at in zip(tokens, chosen, top, strict=False)
            ]
        }
    offsets, at_char = [], 0
    for t in tokens:
        offsets.append(at_char)
        at_char += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": chosen,
        "top_logprobs": [{c["token"]: c["logprob"] for c in at} for at in top],
        "text_offset": offsets,
    }


def dumps(line: dict[str, Any]) -> str:
    return json.dumps(line, ensure_ascii=False, separators=(",", ":"))


def shard_columns(text: str, columns: list[str]) -> dict[str, list[Any]]:
    """A JSONL shard's lines as the columns a Parquet shard would hold (`prompt_tokens`,
    `completion_tokens`, `error`; any other column is the id: `custom_id`), for readers of
    either format such as the report."""
    out: dict[str, list[Any]] = {c: [] for c in columns}
    for raw in text.splitlines():
        line = json.loads(raw)
        usage = ((line.get("response") or {}).get("body") or {}).get("usage") or {}
        values = {
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "error": (line.get("error") or {}).get("message"),
        }
        for c in columns:
            out[c].append(values[c] if c in values else line.get("custom_id"))
    return out
