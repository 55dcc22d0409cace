"""`slmops model run`: one answer or an interactive multi-turn chat, through the registry's runtime or ORT GenAI."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from slmops import progress, templates
from slmops import registry as reg
from slmops.errors import SlmopsError
from slmops.plugin.roles import Registry
from slmops.run import adapters, structure, tools
from slmops.run.chat import OrtGenAIChat, StopText, load_template, safe_messages, stop_list


class ChatRunner:
    """One registered model, answering conversations through the registry's runtime or ORT GenAI. `model run`,
    deploy's question and `slmops serve` all answer through it, so they share template and control-token handling."""

    def __init__(
        self, registry: Registry, name: str, engine: str, overrides: dict[str, Any], adapter: str | None = None
    ):
        self.registry = registry
        self.entry = reg.find_runnable(self.registry, name)
        self.model_dir = Path(self.entry.path)
        self.chosen = load_template(self.model_dir)
        self.info = templates.read_model_info(self.model_dir)  # its special tokens are control tokens too
        self.options = {**self.chosen.family.model_config, **overrides}
        self.tool_use = None
        if "tools" in self.options:  # (tools, tool_choice) from `model run --tools`: calls kept to their schemas
            listed, choice = self.options.pop("tools")
            self.tool_use = tools.ToolUse.of(listed, choice, self.chosen.family.tools)
        self.options.setdefault("max_new_tokens", 256)
        self.adapter = adapter
        if engine == "registry" and adapter != "none" and (adapter or adapters.find(self.model_dir)):
            # Foundry Local's runtime has no way to switch an ORT GenAI adapter on: it would answer as the base.
            progress.note(f"{name}: running with ORT GenAI, which applies LoRA adapter files")
            engine = "ort-genai"
        constrained = self.options.get("constraint") is not None or self.tool_use is not None
        if engine == "registry" and constrained and not self.registry.constrains:
            progress.note(f"{name}: running with ORT GenAI, whose grammar engine keeps the answer to the schema")
            engine = "ort-genai"
        self.engine = engine
        self.ort: OrtGenAIChat | None = None

    def check_turn(self, messages: list[dict[str, str]], options: dict[str, Any] | None = None) -> int:
        """Refuse, before any runtime sees it, a turn no runtime can answer: an empty prompt, or a conversation
        longer than the model's context (Foundry Local answers those with a native exception). Returns the prompt's
        token count."""
        if not messages or not messages[-1]["content"].strip():
            raise SlmopsError("the prompt is empty; type a question")
        from slmops.run.runtime import context_length

        options = options or self.options
        context = context_length(self.model_dir)
        limit = min(context, int(options.get("max_length") or context))
        text = options.get("prompt") or templates.render(  # prompt: only for ORT GenAI (with_tools)
            self.chosen.family, safe_messages(messages, self.chosen, self.info), self.chosen.default_system
        )
        count = (
            len(templates.count_tokens(self.model_dir, text)) if (self.model_dir / "tokenizer.json").is_file() else 0
        )
        if count >= limit:
            raise SlmopsError(
                f"the conversation is {count} tokens, the model's context is {limit}; shorten the prompt"
                " (in a chat: start a new one)"
            )
        constraint = options.get("constraint")
        if constraint is not None and self.engine == "registry" and not self.registry.constrains:
            raise structure.ConstraintError(structure.engine_refusal(f"registry ({self.registry.name})"))
        if constraint is not None and self.engine != "registry":
            self.load()
            self.ort.session.check_constraint(constraint)
        return count

    def with_tools(
        self, messages: list[dict[str, Any]], use: tools.ToolUse | None, options: dict[str, Any]
    ) -> list[dict[str, str]]:
        """A conversation that may hold tools as this runner's engine takes it: plain turns (returned), and for ORT
        GenAI, where the model's own chat template takes tools, the prompt that template writes (options["prompt"])
        and the calls' grammar (options["constraint"])."""
        plain, prompt = tools.conversation(messages, use, self.chosen.family, self.info)
        if use is not None:
            options["constraint"] = use.constraint()
            if prompt and self.engine != "registry":
                options["prompt"] = prompt
        return plain

    def load(self) -> None:
        """Load the model now rather than at the first question."""
        if self.engine == "registry" and self.registry.load(self.entry.name):
            return
        self.engine = "ort-genai"
        if self.ort is None:
            self.ort = OrtGenAIChat(self.model_dir, self.adapter)

    def stream(self, messages: list[dict[str, str]], options: dict[str, Any], usage: dict[str, Any]) -> Iterator[str]:
        """check_turn, then generate (with this runner's tools described to the model, where it has some)."""
        if self.tool_use is not None:
            options = dict(options)
            messages = self.with_tools(messages, self.tool_use, options)
        self.check_turn(messages, options)
        yield from self.generate(messages, options, usage)

    def generate(self, messages: list[dict[str, str]], options: dict[str, Any], usage: dict[str, Any]) -> Iterator[str]:
        """The answer to a checked turn, piece by piece (options as OrtGenAIChat.stream takes them); usage gets token
        counts and finish_reason."""
        if self.engine == "registry":
            try:
                # The runtime applies the chat template itself: only neutralise control tokens in user text.
                pieces = self.registry.chat(
                    self.entry.name, safe_messages(messages, self.chosen, self.info), options, usage
                )
            except NotImplementedError:
                self.engine = "ort-genai"
            else:
                yield from _with_stops(pieces, options, usage)
                return
        if self.ort is None:
            self.ort = OrtGenAIChat(self.model_dir, self.adapter)
        yield from self.ort.stream(messages, options, usage)

    def answer(self, prompt: str, system: str | None, stream_to: IO[str] | None) -> dict[str, Any]:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        usage: dict[str, Any] = {}
        start = time.perf_counter()
        first = None
        parts = []
        watcher = tools.CallWatcher(self.tool_use) if self.tool_use else None
        for piece in self.stream(messages, self.options, usage):
            if first is None:
                first = time.perf_counter() - start
            parts.append(piece)
            if watcher:  # a call is shown parsed at the end, not as the model writes it
                piece = watcher.push(piece)
            if stream_to:
                stream_to.write(piece)
                stream_to.flush()
        total = time.perf_counter() - start
        result = {
            "model": self.entry.name,
            "engine": self.engine,
            "adapter": self.ort.adapter.name if self.ort else None,
            "answer": "".join(parts),
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "ttft_s": round(first, 4) if first else None,
            "total_s": round(total, 4),
        }
        if self.tool_use is not None:
            result["answer"], result["tool_calls"] = self.tool_use.parse(result["answer"])
            began = (result["answer"] or "").lstrip().startswith(self.tool_use.syntax.opening().strip())
            if stream_to:  # the calls as a person reads them; the answer's own text went out as it came
                if watcher.calling is None and not began:  # it ended on what could have begun a call, but did not
                    stream_to.write(watcher.held)
                for call in result["tool_calls"]:
                    lead = "\n" if result["answer"] else ""
                    stream_to.write(f"{lead}-> {call['function']['name']}({call['function']['arguments']})")
            if began and not result["tool_calls"]:  # the grammar keeps a call whole; only running out cuts it
                why = "raise --max-new-tokens" if usage.get("finish_reason") == "length" else "see --json for its text"
                progress.note(f"the model began a tool call it did not finish: {why}")
            return result
        constraint = self.options.get("constraint")
        if constraint is not None:
            result["schema_problem"] = problem = constraint.problem(result["answer"])
            if problem:  # the grammar keeps each token to the schema; only running out of tokens leaves it unfinished
                why = "it ran out of tokens: raise --max-new-tokens" if usage.get("finish_reason") == "length" else ""
                progress.note(f"the answer does not meet the schema: {problem}{'; ' + why if why else ''}")
        return result


def _with_stops(pieces: Iterator[str], options: dict[str, Any], usage: dict[str, Any]) -> Iterator[str]:
    """A registry runtime's answer cut at the caller's stop strings, with its finish_reason."""
    text = StopText(stop_list(options.get("stop")))
    try:
        yield from text.cut(pieces)
    finally:
        close = getattr(pieces, "close", None)
        if close:
            close()  # ends the runtime's request now, not when the iterator is collected
    out_of_tokens = usage.get("completion_tokens", 0) >= int(options.get("max_new_tokens") or 256)
    usage["finish_reason"] = "length" if out_of_tokens and not text.stopped else "stop"
