"""Write data/requests.jsonl: OpenAI batch requests (as OpenAI's batch guide writes them) made
from the first rows of data/prompts.parquet, for jobs/openai-batch.yaml.

Most are chat completions; every fifth is a plain completion; a few ask for two samples with
log-probabilities, or for JSON that matches a schema.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
ROWS = 400
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "maxLength": 40}},
    "required": ["answer"],
}


def request(i: int, row_id: str, prompt: str) -> dict:
    if i % 5 == 4:
        url, body = "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 24}
    else:
        messages = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": prompt},
        ]
        url, body = "/v1/chat/completions", {"model": "tiny", "messages": messages,
                                             "max_tokens": 32, "temperature": 0.7}
        if i % 10 == 1:
            body.update(n=2, logprobs=True, top_logprobs=2)
        if i % 10 == 3:
            body.update(max_tokens=64, response_format={
                "type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}})
    return {"custom_id": row_id, "method": "POST", "url": url, "body": body}


def main() -> None:
    table = pq.read_table(HERE / "prompts.parquet", columns=["id", "prompt"]).slice(0, ROWS)
    lines = [
        json.dumps(request(i, row_id, prompt))
        for i, (row_id, prompt) in enumerate(zip(*table.to_pydict().values(), strict=True))
    ]
    (HERE / "requests.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
