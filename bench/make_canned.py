#!/usr/bin/env python3
"""Writes the canned upstream responses in bench/canned/ (committed; rerun only to change them).

llama.cpp's shapes (b11434): /completion as one JSON object, or as `data: {json}\\n\\n` events
(partials, then a final `stop: true` event, no [DONE]); /props; /v1/models. OpenAI's shapes
(chat.completion and chat.completion.chunk SSE ending in [DONE]) for LiteLLM's `openai/`
provider, with the same 200 tokens, so both gateways relay the same text.
"""

from __future__ import annotations

import json
from pathlib import Path

TOKENS_PER_RESPONSE = 200
PROMPT_TOKENS = 31
WORDS = [
    " The",
    " quick",
    " brown",
    " fox",
    " jumps",
    " over",
    " the",
    " lazy",
    " dog",
    ".",
    " It",
    " was",
    " a",
    " bright",
    " cold",
    " day",
    " in",
    " April",
    ",",
    " and",
]
CREATED = 1_700_000_000
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def main() -> None:
    out = Path(__file__).resolve().parent / "canned"
    out.mkdir(exist_ok=True)
    tokens = [WORDS[i % len(WORDS)] for i in range(TOKENS_PER_RESPONSE)]
    text = "".join(tokens)
    timings = {
        "prompt_n": PROMPT_TOKENS,
        "prompt_ms": 5.1,
        "predicted_n": len(tokens),
        "predicted_ms": 1000.0,
        "predicted_per_second": 200.0,
    }
    files: dict[str, str] = {}

    files["props.json"] = dumps(
        {
            "chat_template": CHATML,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "model_path": "/m/fake.gguf",
            "total_slots": 1024,
            "default_generation_settings": {"n_ctx": 4096},
        }
    )
    files["models.json"] = dumps(
        {
            "object": "list",
            "data": [
                {
                    "id": "fake.gguf",
                    "object": "model",
                    "created": CREATED,
                    "owned_by": "llamacpp",
                    "meta": {"n_ctx_train": 4096},
                }
            ],
        }
    )

    files["llamacpp-completion.json"] = dumps(
        {
            "index": 0,
            "content": text,
            "tokens": [],
            "id_slot": 0,
            "stop": True,
            "model": "fake.gguf",
            "tokens_predicted": len(tokens),
            "tokens_evaluated": PROMPT_TOKENS,
            "generation_settings": {"n_predict": len(tokens), "temperature": 0.8},
            "prompt": "",
            "has_new_line": False,
            "truncated": False,
            "stop_type": "limit",
            "stopping_word": "",
            "tokens_cached": PROMPT_TOKENS - 1,
            "timings": timings,
        }
    )
    events = []
    for i, tok in enumerate(tokens):
        events.append(
            "data: "
            + dumps(
                {
                    "index": 0,
                    "content": tok,
                    "tokens": [1000 + i],
                    "stop": False,
                    "id_slot": 0,
                    "tokens_predicted": i + 1,
                    "tokens_evaluated": PROMPT_TOKENS,
                }
            )
            + "\n\n"
        )
    events.append(
        "data: "
        + dumps(
            {
                "index": 0,
                "content": "",
                "tokens": [],
                "id_slot": 0,
                "stop": True,
                "model": "fake.gguf",
                "tokens_predicted": len(tokens),
                "tokens_evaluated": PROMPT_TOKENS,
                "generation_settings": {},
                "prompt": "",
                "has_new_line": False,
                "truncated": False,
                "stop_type": "limit",
                "stopping_word": "",
                "tokens_cached": PROMPT_TOKENS - 1,
                "timings": timings,
            }
        )
        + "\n\n"
    )
    files["llamacpp-stream.sse"] = "".join(events)

    usage = {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": len(tokens),
        "total_tokens": PROMPT_TOKENS + len(tokens),
    }
    files["oai-chat.json"] = dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": CREATED,
            "model": "fake.gguf",
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": "length",
                }
            ],
            "usage": usage,
        }
    )
    head = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": "fake.gguf",
        "system_fingerprint": None,
    }
    chunks = [
        {
            **head,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        }
    ]
    chunks += [
        {
            **head,
            "choices": [
                {"index": 0, "delta": {"content": tok}, "logprobs": None, "finish_reason": None}
            ],
        }
        for tok in tokens
    ]
    chunks.append(
        {
            **head,
            "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}],
        }
    )
    files["oai-stream.sse"] = "".join(f"data: {dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"

    # /tokenize: the plain-text token ids of a message that holds a control token (item 22).
    # One canned answer serves every text; the proxy caches it per text after the first call.
    files["tokenize.json"] = dumps({"tokens": list(range(100, 116))})

    for name, content in files.items():
        (out / name).write_text(content, encoding="utf-8")
        print(f"{out / name}: {len(content.encode())} bytes")


if __name__ == "__main__":
    main()
