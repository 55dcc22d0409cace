"""Chat with a deployed model folder through ORT GenAI directly, using its inference_model.json template."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import templates
from .errors import SlmopsError

Messages = list[dict[str, str]]


def load_template(model_dir: Path) -> templates.ChosenTemplate:
    path = model_dir / "inference_model.json"
    if path.is_file():
        return templates.family_from_inference_model(json.loads(path.read_text()))
    return templates.choose(model_dir)


def safe_messages(messages: Messages, chosen: templates.ChosenTemplate, info=None) -> Messages:
    """User and assistant text with the template's control tokens broken, so it cannot open a new turn."""
    tokens = templates.control_tokens(chosen.family, info)

    def clean(text: str) -> str:  # invalid UTF-8 (lone surrogates) becomes U+FFFD instead of an encoder crash
        return text.encode("utf-8", "replace").decode("utf-8")

    return [{"role": m["role"], "content": templates.neutralize(clean(m["content"]), tokens) if m["role"] != "system" else clean(m["content"])}
            for m in messages]


class OrtGenAIChat:
    """One loaded model; stream() answers a conversation token by token."""

    def __init__(self, model_dir: Path, adapter: str | None = None):
        from .runtime import Session

        self.model_dir = Path(model_dir)
        self.session = Session(self.model_dir, adapter)
        self.adapter, self.load_s, self.context_length = self.session.adapter, self.session.load_s, self.session.context_length
        self.chosen = load_template(self.model_dir)
        self.info = templates.read_model_info(self.model_dir)

    def prompt_tokens(self, messages: Messages) -> list[int]:
        text = templates.render(self.chosen.family, safe_messages(messages, self.chosen, self.info), self.chosen.default_system)
        return self.session.encode(text)

    def stream(self, messages: Messages, options: dict[str, Any], usage: dict[str, Any]) -> Iterator[str]:
        tokens = self.prompt_tokens(messages)
        max_new = int(options.get("max_new_tokens") or 256)
        limit = min(self.context_length, int(options.get("max_length") or self.context_length))
        if len(tokens) >= limit:
            raise SlmopsError(f"the prompt is {len(tokens)} tokens, more than the model's context of {limit}; shorten it")
        temperature = float(options.get("temperature", 0.0) or 0.0)
        search = {"do_sample": temperature > 0, "repetition_penalty": float(options.get("repetition_penalty", 1.0) or 1.0)}
        if temperature > 0:
            search.update(temperature=temperature, top_p=float(options.get("top_p", 1.0) or 1.0))
        generator = self.session.generator(min(limit, len(tokens) + max_new), **search)
        stream = self.session.tokenizer.create_stream()
        start = time.perf_counter()
        usage.update(prompt_tokens=len(tokens), completion_tokens=0)
        generator.append_tokens(tokens)
        stops = [s for s in self.chosen.family.stop if s]
        text = ""
        while not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            usage["completion_tokens"] += 1
            if usage["completion_tokens"] == 1:
                usage["ttft_s"] = time.perf_counter() - start
            piece = stream.decode(token)
            text += piece
            if any(s in text for s in stops):
                break
            yield piece
        usage["total_s"] = time.perf_counter() - start
