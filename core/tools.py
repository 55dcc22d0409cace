"""Tool calls: OpenAI's `tools` and `tool_choice` in the model's own tool-call syntax (its family's ToolSyntax).

The tools are described to the model in its system message, earlier calls and tool results are written as the
family writes them, and the answer is generated under a grammar (ORT GenAI's LLGuidance, lark with `%json`) that
lets a call be nothing but `call_start {"name": one of the tools, "arguments": valid for that tool} call_end`, so
its arguments always parse and validate. `auto` lets the answer be plain text instead (text that does not begin
the way a call does); `required` and a named function allow one call and nothing else; `none` is a plain answer."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from .roles import ToolSyntax
from .structure import COMPACT, Constraint, ConstraintError, json_schema

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def spec(self) -> dict[str, Any]:
        """The tool as OpenAI writes it, for the model's prompt."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": function}


def read_tools(tools: Any, what: str = "tools") -> list[Tool]:
    """Tools in OpenAI's form ([{"type": "function", "function": {name, description, parameters}}]), each
    parameters schema checked; ConstraintError (one line) for anything else."""
    if not isinstance(tools, list) or not tools:
        raise ConstraintError(f"{what} must be a non-empty list of functions")
    read: list[Tool] = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name or len(name) > 64:
            raise ConstraintError(f'{what}[{i}] must be {{"type": "function", "function": {{"name", "parameters"}}}}')
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        json_schema(parameters, f"{what}[{i}].function.parameters")
        read.append(Tool(name, str(function.get("description") or ""), parameters))
    if len({t.name for t in read}) < len(read):
        raise ConstraintError(f"{what} names a function twice; give each function once")
    return read


@dataclass(frozen=True)
class ToolUse:
    """The tools of one request, how they may be used (choice: "auto", "required" or a function's name) and the
    model's syntax for them."""

    tools: tuple[Tool, ...]
    choice: str
    syntax: ToolSyntax

    @classmethod
    def of(cls, tools: Any, choice: Any, syntax: ToolSyntax) -> ToolUse | None:
        """From a request's tools and tool_choice; None when no tool may be called."""
        if choice == "none" or (tools is None and choice is None):
            return None
        if tools is None:
            raise ConstraintError("tool_choice names tools but the request has none; send tools with it")
        read = read_tools(tools)
        if choice is None or choice in ("auto", "required"):
            return cls(tuple(read), choice or "auto", syntax)
        named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
        if not isinstance(named, str):
            raise ConstraintError(
                'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
            )
        if named not in {t.name for t in read}:
            raise ConstraintError(
                f"tool_choice names {named!r}, which is not among the tools ({', '.join(t.name for t in read)})"
            )
        return cls(tuple(read), named, syntax)

    def call_schema(self) -> dict[str, Any]:
        """The JSON one call must be: a callable tool's name and arguments valid for that tool."""
        tools = [t for t in self.tools if self.choice in ("auto", "required", t.name)]
        key = self.syntax.arguments_key
        forms = [
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, key: t.parameters},
                "required": ["name", key],
                "additionalProperties": False,
            }
            for t in tools
        ]
        return forms[0] if len(forms) == 1 else {"anyOf": forms}

    def constraint(self) -> Constraint:
        schema = self.call_schema()
        start, end = self.syntax.call_start, self.syntax.call_end
        call = " ".join(
            [*([lark_string(start)] if start else []), "%json", json.dumps({"x-guidance": COMPACT, **schema})]
            + ([lark_string(end)] if end else [])
        )
        grammar = f"start: call\ncall: {call}\n"
        if self.choice == "auto":  # or plain text: anything that does not begin the way a call does
            first = (self.syntax.call_start or "{")[0]
            grammar = f"start: call | TEXT\nTEXT: /[^{regex_char(first)}][\\s\\S]*/\ncall: {call}\n"
        return Constraint(schema, kind="lark_grammar", grammar=grammar)

    def system_text(self) -> str:
        return self.syntax.instructions.replace("{Tools}", "\n".join(json.dumps(t.spec()) for t in self.tools))

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """The answer's text (None when it is only calls) and its calls in OpenAI's form."""
        calls, rest = split_calls(text, self.syntax)
        return (rest or None) if calls else text, calls


def split_calls(text: str, syntax: ToolSyntax) -> tuple[list[dict[str, Any]], str]:
    """The tool calls written in text (OpenAI's form, arguments as a JSON string) and the text around them."""
    decoder = json.JSONDecoder()
    calls, rest, at = [], [], 0
    while (start := text.find(syntax.call_start, at) if syntax.call_start else text.find("{", at)) != -1:
        body = start + len(syntax.call_start)
        try:
            value, end = decoder.raw_decode(text, body)
        except ValueError:
            break
        if not (isinstance(value, dict) and isinstance(value.get("name"), str)):
            break
        rest.append(text[at:start])
        arguments = value.get(syntax.arguments_key, {})
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": value["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
            }
        )
        at = end + len(syntax.call_end) if text.startswith(syntax.call_end, end) else end
    rest.append(text[at:])
    return calls, "".join(rest).strip()


def plain_messages(messages: Messages, syntax: ToolSyntax, use: ToolUse | None) -> list[dict[str, str]]:
    """A conversation with tools as the family's plain turns: the tools described in the system message, each
    assistant call written in the model's syntax, each tool result as a user turn."""
    plain = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "tool":
            plain.append({"role": "user", "content": syntax.result.replace("{Content}", content)})
        elif role == "assistant" and m.get("tool_calls"):
            written = [
                syntax.call_start
                + json.dumps({"name": c["function"]["name"], syntax.arguments_key: arguments_of(c)})
                + syntax.call_end
                for c in m["tool_calls"]
            ]
            plain.append({"role": "assistant", "content": "\n".join(([content] if content else []) + written)})
        else:
            plain.append({"role": role, "content": content})
    if use is not None:
        if plain and plain[0]["role"] == "system":
            plain[0] = {"role": "system", "content": f"{plain[0]['content']}\n\n{use.system_text()}"}
        else:
            plain.insert(0, {"role": "system", "content": use.system_text()})
    return plain


def arguments_of(call: dict[str, Any]) -> Any:
    """A call's arguments as JSON (OpenAI sends them as a JSON string)."""
    arguments = call["function"].get("arguments") or "{}"
    try:
        return json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        raise ConstraintError(f"the arguments of the earlier call {call['function']['name']!r} are not JSON") from None


def lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string literal is a lark string literal


def regex_char(char: str) -> str:
    return "\\" + char if char in "\\]^-[/" else char


class CallWatcher:
    """Streams an answer's text as it comes, and holds it back from the moment it begins the way a call does: calls
    go to the client whole, parsed, at the end (finish)."""

    def __init__(self, use: ToolUse):
        self.use, self.held, self.calling = use, "", None

    def push(self, piece: str) -> str:
        """The text that can go out now."""
        if self.calling is False:
            return piece
        self.held += piece
        start = self.use.syntax.call_start or "{"
        if self.held.startswith(start):
            self.calling = True
        elif self.calling is None and not start.startswith(self.held):
            self.calling, text, self.held = False, self.held, ""
            return text
        return ""

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """The text held back that is not a call, and the calls."""
        content, calls = self.use.parse(self.held)
        return content or "", calls
