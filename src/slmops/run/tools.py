"""Tool calls: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls` in the model's own tool-call syntax (its
family's ToolSyntax).

Where the model's own chat template takes tools (Qwen2.5's, Llama 3.1's, Mistral's), it writes the prompt: the tools,
earlier calls and tool results, as transformers passes them. Otherwise the family's ToolSyntax does, in plain turns
(the tools described in the system message, results as user turns). Either way the answer is generated under a
grammar (LLGuidance, lark with `%json`) that lets a call be nothing but `call_start {"name": one of the tools,
"arguments": valid for that tool} call_end`, so its arguments always parse and validate. `auto` lets the answer be
plain text instead (text that does not begin the way a call does); `required` and a named function allow only calls;
`none` is a plain answer. One call an answer unless the request sets parallel_tool_calls (then at most MAX_CALLS): as
llama.cpp's server, since small models asked for several tend to repeat a call (SmolLM2-135M did on every question)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from slmops import templates
from slmops.plugin.roles import ModelInfo, TemplateFamily, ToolSyntax
from slmops.run.chat import safe_content
from slmops.run.structure import COMPACT, Constraint, ConstraintError, json_schema

Messages = list[dict[str, Any]]
MAX_CALLS = 4  # calls in one answer: a small model that starts repeating a call stops here, not at max_tokens


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
    parallel: bool = False  # several calls in one answer

    @classmethod
    def of(cls, tools: Any, choice: Any, syntax: ToolSyntax, parallel: bool = False) -> ToolUse | None:
        """From a request's tools, tool_choice and parallel_tool_calls; None when no tool may be called."""
        if choice == "none" or (tools is None and choice is None):
            return None
        if tools is None:
            raise ConstraintError("tool_choice names tools but the request has none; send tools with it")
        read = read_tools(tools)
        if choice is None or choice in ("auto", "required"):
            return cls(tuple(read), choice or "auto", syntax, parallel)
        named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
        if not isinstance(named, str):
            raise ConstraintError(
                'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
            )
        if named not in {t.name for t in read}:
            raise ConstraintError(
                f"tool_choice names {named!r}, which is not among the tools ({', '.join(t.name for t in read)})"
            )
        return cls(tuple(read), named, syntax, parallel)

    def call_schema(self) -> dict[str, Any]:
        """The JSON one call must be: a callable tool's name and arguments valid for that tool."""
        tools = [t for t in self.tools if self.choice in ("auto", "required", t.name)]
        key = self.syntax.arguments_key
        forms = [
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, key: closed(t.parameters)},
                "required": ["name", key],
                "additionalProperties": False,
            }
            for t in tools
        ]
        return forms[0] if len(forms) == 1 else {"anyOf": forms}

    def constraint(self) -> Constraint:
        one, most = self.call_schema(), MAX_CALLS if self.parallel else 1
        start, end = self.syntax.call_start, self.syntax.call_end
        if self.syntax.in_list:  # the calls as one JSON array
            schema = {"type": "array", "items": one, "minItems": 1, "maxItems": most}
            body, calls = "%json " + json.dumps({"x-guidance": COMPACT, **schema}), "call"
        else:  # one block a call, a newline between them
            schema = one
            body = "%json " + json.dumps({"x-guidance": COMPACT, **one})
            calls = "call" if most == 1 else f'call ("\\n" call){{0,{most - 1}}}'
        call = " ".join([*([lark_string(start)] if start else []), body, *([lark_string(end)] if end else [])])
        grammar = f"start: {calls}\ncall: {call}\n"
        if self.choice == "auto":  # or plain text: anything that does not begin the way a call does
            grammar = (
                f"start: {calls} | TEXT\nTEXT: /[^{regex_char(self.syntax.opening()[0])}][\\s\\S]*/\ncall: {call}\n"
            )
        return Constraint(schema, kind="lark_grammar", grammar=grammar)

    def system_text(self) -> str:
        specs = [t.spec() for t in self.tools]
        described = json.dumps(specs) if self.syntax.in_list else "\n".join(json.dumps(s) for s in specs)
        return self.syntax.instructions.replace("{Tools}", described)

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """The answer's text (None when it is only calls) and its calls in OpenAI's form."""
        calls, rest = split_calls(text, self.syntax)
        return (rest or None) if calls else text, calls


SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")


def closed(schema: Any) -> Any:
    """schema with every object that declares properties but says nothing of others closed to them
    (additionalProperties false), for the call's grammar. A function's parameters are its signature; left open, a
    small model makes up parameters and runs on until max_tokens (SmolLM2 did on get_time {timezone}). llama.cpp's
    schema-to-grammar converter closes objects by default for the same reason."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed(sub) for name, sub in out[key].items()}
    for key in SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed(sub) for sub in out[key]]
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = closed(out[key])
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def split_calls(text: str, syntax: ToolSyntax) -> tuple[list[dict[str, Any]], str]:
    """The tool calls written in text (OpenAI's form, arguments as a JSON string) and the text around them. Lenient
    where models vary: whitespace around the markers, "arguments" or "parameters", one call or an array of them."""
    decoder = json.JSONDecoder()
    marker, end = syntax.call_start.strip(), syntax.call_end.strip()
    calls, rest, at = [], [], 0
    while (start := text.find(syntax.opening().strip(), at)) != -1:
        body = skip_space(text, start + len(marker))
        try:
            value, stop = decoder.raw_decode(text, body)
        except ValueError:
            break
        written = value if isinstance(value, list) else [value]
        if not written or not all(isinstance(v, dict) and isinstance(v.get("name"), str) for v in written):
            break
        rest.append(text[at:start])
        calls += [openai_call(v, syntax) for v in written]
        after = skip_space(text, stop)
        at = after + len(end) if end and text.startswith(end, after) else stop
    rest.append(text[at:])
    return calls, "".join(rest).strip()


def skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at


def openai_call(written: dict[str, Any], syntax: ToolSyntax) -> dict[str, Any]:
    arguments = next((written[k] for k in (syntax.arguments_key, "arguments", "parameters") if k in written), {})
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": written["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def plain_messages(messages: Messages, syntax: ToolSyntax, use: ToolUse | None) -> list[dict[str, str]]:
    """A conversation with tools as the family's plain turns: the tools described in the system message, each
    assistant call written in the model's syntax, each tool result as a user turn."""
    plain = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "tool":
            plain.append({"role": "user", "content": syntax.result.replace("{Content}", content)})
        elif role == "assistant" and m.get("tool_calls"):
            written = [{"name": c["function"]["name"], syntax.arguments_key: arguments_of(c)} for c in m["tool_calls"]]
            blocks = [json.dumps(written)] if syntax.in_list else [json.dumps(w) for w in written]
            calls = [syntax.call_start + b + syntax.call_end for b in blocks]
            plain.append({"role": "assistant", "content": "\n".join(([content] if content else []) + calls)})
        else:
            plain.append({"role": role, "content": content})
    if use is not None:
        if plain and plain[0]["role"] == "system":
            plain[0] = {"role": "system", "content": f"{plain[0]['content']}\n\n{use.system_text()}"}
        else:
            plain.insert(0, {"role": "system", "content": use.system_text()})
    return plain


def conversation(
    messages: Messages, use: ToolUse | None, family: TemplateFamily, info: ModelInfo
) -> tuple[list[dict[str, str]], str | None]:
    """A conversation that may hold tools, ready for a runtime: (its plain turns, as the family writes them, which a
    runtime that renders its own template takes; the whole prompt as the model's own chat template writes it with
    the tools, or None where that template takes no tools or refuses the conversation)."""
    plain = plain_messages(messages, use.syntax if use else family.tools, use)
    if use is None or not templates.takes_tools(info.chat_template):
        return plain, None
    tokens = templates.control_tokens(family, info)
    written = []
    for m in messages:  # user, assistant and tool text cannot open a turn of its own
        turn = {"role": m["role"], "content": safe_content(m["role"], m.get("content") or "", tokens)}
        if m.get("tool_calls"):  # arguments as objects, as transformers' templates take them
            turn["tool_calls"] = [
                {**c, "function": {"name": c["function"]["name"], "arguments": arguments_of(c)}}
                for c in m["tool_calls"]
            ]
        if m.get("tool_call_id"):
            turn["tool_call_id"] = m["tool_call_id"]
        written.append(turn)
    try:
        return plain, templates.tokenizer_render(info, written, tools=[t.spec() for t in use.tools])
    except Exception:  # the template raised (a role order it refuses, say): the family's turns, as for any model
        return plain, None


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
        start = self.use.syntax.opening()
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
