"""Chat with a deployed model folder through ORT GenAI directly, using its inference_model.json template."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from slmops import templates
from slmops.errors import SlmopsError
from slmops.run.adapters import DEFAULT

Messages = list[dict[str, str]]


def load_template(model_dir: Path) -> templates.ChosenTemplate:
    path = model_dir / "inference_model.json"
    if path.is_file():
        return templates.family_from_inference_model(json.loads(path.read_text()))
    return templates.choose(model_dir)


def safe_messages(messages: Messages, chosen: templates.ChosenTemplate, info=None) -> Messages:
    """User and assistant text with the template's control tokens broken, so it cannot open a new turn."""
    tokens = templates.control_tokens(chosen.family, info)
    return [{"role": m["role"], "content": safe_content(m["role"], m["content"], tokens)} for m in messages]


def safe_content(role: str, content: str, tokens: list[str]) -> str:
    """One turn's text made safe: invalid UTF-8 (lone surrogates) becomes U+FFFD instead of an encoder crash, and
    outside the system turn the control tokens are broken."""
    text = content.encode("utf-8", "replace").decode("utf-8")
    return text if role == "system" else templates.neutralize(text, tokens)


class StopText:
    """Text held back while it could still turn into a stop string, so what comes out never holds one (a stop
    string may arrive split over several tokens). push() returns what is safe to show; stopped says a stop came."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        self.held += piece
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            out, self.held = self.held[: min(found)], ""
            return out
        keep = max(
            (k for s in self.stops for k in range(1, min(len(s), len(self.held) + 1)) if self.held.endswith(s[:k])),
            default=0,
        )
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return out

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out

    def cut(self, pieces: Iterable[str]) -> Iterator[str]:
        """pieces up to the first stop string (left out), what was held back given at the end."""
        for piece in pieces:
            out = self.push(piece)
            if out:
                yield out
            if self.stopped:
                return
        rest = self.flush()
        if rest:
            yield rest


def stop_list(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


class OrtGenAIChat:
    """One loaded model; stream() answers a conversation token by token."""

    def __init__(self, model_dir: Path, adapter: str | None = None):
        from slmops.run.runtime import Session

        self.model_dir = Path(model_dir)
        self.session = Session(self.model_dir, adapter)
        self.adapter, self.load_s, self.context_length = (
            self.session.adapter,
            self.session.load_s,
            self.session.context_length,
        )
        self.chosen = load_template(self.model_dir)
        self.info = templates.read_model_info(self.model_dir)

    def prompt_tokens(self, messages: Messages) -> list[int]:
        text = templates.render(
            self.chosen.family, safe_messages(messages, self.chosen, self.info), self.chosen.default_system
        )
        return self.session.tokens(text)  # the template wrote the BOS where the model's own template does

    def stream(self, messages: Messages, options: dict[str, Any], usage: dict[str, Any]) -> Iterator[str]:
        """The answer piece by piece. options: max_new_tokens, max_length, temperature, top_p, repetition_penalty,
        seed, stop (strings that end the answer, left out of it), constraint (a structure.Constraint the answer keeps
        to), prompt (the whole prompt, already written by the model's own template: a conversation with tools; it
        stands for messages), adapter (the LoRA adapter to answer with, "none" for the base; default: the model's). usage gets token counts, TTFT and finish_reason
        ("stop": the model or a stop string ended it; "length": it ran out of tokens)."""
        tokens = self.session.tokens(options["prompt"]) if options.get("prompt") else self.prompt_tokens(messages)
        max_new = int(options.get("max_new_tokens") or 256)
        limit = min(self.context_length, int(options.get("max_length") or self.context_length))
        if len(tokens) >= limit:
            raise SlmopsError(
                f"the prompt is {len(tokens)} tokens, more than the model's context of {limit}; shorten it"
            )
        temperature = float(options.get("temperature", 0.0) or 0.0)
        search = {
            "do_sample": temperature > 0,
            "repetition_penalty": float(options.get("repetition_penalty", 1.0) or 1.0),
        }
        if temperature > 0:
            search.update(temperature=temperature, top_p=float(options.get("top_p", 1.0) or 1.0))
        if options.get("seed") is not None:
            search["random_seed"] = int(options["seed"])
        budget = min(limit, len(tokens) + max_new) - len(tokens)
        adapter = options.get("adapter", DEFAULT)  # `slmops serve`'s base:adapter, per request
        generator = self.session.generator(len(tokens) + budget, options.get("constraint"), adapter, **search)
        stream = self.session.tokenizer.create_stream()
        start = time.perf_counter()
        usage.update(prompt_tokens=len(tokens), completion_tokens=0, finish_reason="stop")
        generator.append_tokens(tokens)

        def decoded() -> Iterator[str]:
            while not generator.is_done():
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
                usage["completion_tokens"] += 1
                if usage["completion_tokens"] == 1:
                    usage["ttft_s"] = time.perf_counter() - start
                if usage["completion_tokens"] >= budget and not self.session.is_eos(token):
                    usage["finish_reason"] = "length"
                yield stream.decode(token)

        text = StopText(list(self.chosen.family.stop) + stop_list(options.get("stop")))
        yield from text.cut(decoded())
        if text.stopped:  # a stop string in the last token still ends the answer as "stop"
            usage["finish_reason"] = "stop"
        usage["total_s"] = time.perf_counter() - start
