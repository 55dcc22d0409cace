"""Tool calls without a model: the request read and refused, conversations written in a family's syntax, calls
parsed back and held back while streaming, and the grammar the engine compiles. The served round trip is in
test_serve."""

from __future__ import annotations

import json

import pytest

from slmops import tools
from slmops.api import ToolSyntax
from slmops.structure import ConstraintError
from slmops.templates import family_by_name

HERMES = ToolSyntax()
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time"}}


def test_choices_and_what_they_allow():
    assert tools.ToolUse.of([WEATHER], "none", HERMES) is None
    assert tools.ToolUse.of(None, None, HERMES) is None
    auto = tools.ToolUse.of([WEATHER, CLOCK], None, HERMES)
    assert auto.choice == "auto" and [t.name for t in auto.tools] == ["get_weather", "get_time"]
    assert len(auto.call_schema()["anyOf"]) == 2
    named = tools.ToolUse.of([WEATHER, CLOCK], {"type": "function", "function": {"name": "get_time"}}, HERMES)
    assert named.call_schema()["properties"]["name"] == {"const": "get_time"}
    assert tools.ToolUse.of([CLOCK], "required", HERMES).tools[0].parameters == {"type": "object", "properties": {}}
    grammar = auto.constraint().grammar
    assert grammar.startswith("start: call | TEXT") and '"<tool_call>\\n" %json' in grammar
    assert "TEXT" not in tools.ToolUse.of([WEATHER], "required", HERMES).constraint().grammar


@pytest.mark.parametrize(
    "listed, choice, words",
    [
        ([WEATHER], {"type": "function", "function": {"name": "nosuch"}}, "not among the tools"),
        (None, "required", "has none"),
        ([], "auto", "non-empty list"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}], None, "valid JSON schema"),
        ([{"type": "code_interpreter"}], None, "must be"),
        ([WEATHER, WEATHER], None, "twice"),
        ([WEATHER], "sometimes", "tool_choice must be"),
    ],
)
def test_bad_tools_are_one_line(listed, choice, words):
    with pytest.raises(ConstraintError, match=words):
        tools.ToolUse.of(listed, choice, HERMES)


def test_a_conversation_in_the_family_syntax():
    use = tools.ToolUse.of([WEATHER], "auto", HERMES)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    plain = tools.plain_messages(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": '{"c": 3}'},
        ],
        HERMES,
        use,
    )
    assert [m["role"] for m in plain] == ["system", "user", "assistant", "user"]
    assert (
        plain[0]["content"].startswith("Be brief.\n\n# Tools")
        and json.dumps(use.tools[0].spec()) in plain[0]["content"]
    )
    assert plain[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert plain[3]["content"] == '<tool_response>\n{"c": 3}\n</tool_response>'
    assert tools.plain_messages([{"role": "user", "content": "hi"}], HERMES, use)[0]["role"] == "system"


def test_calls_parsed_back_in_each_syntax():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    content, calls = tools.ToolUse.of([WEATHER], "auto", HERMES).parse(text)
    assert content is None and calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert tools.ToolUse.of([WEATHER], "auto", HERMES).parse("It is sunny.") == ("It is sunny.", [])
    llama3 = family_by_name("llama3").tools  # a family that says how its models call tools
    _, calls = tools.ToolUse.of([WEATHER], "auto", llama3).parse(
        '{"name": "get_weather", "parameters": {"city": "Rome"}}'
    )
    assert calls[0]["function"]["arguments"] == '{"city": "Rome"}'
    assert "/[^{]" in tools.ToolUse.of([WEATHER], "auto", llama3).constraint().grammar  # text: not a call's start


def test_streaming_holds_back_only_what_may_be_a_call():
    use = tools.ToolUse.of([WEATHER], "auto", HERMES)
    watcher = tools.CallWatcher(use)
    assert [
        watcher.push(p)
        for p in ("<to", "ol_call>\n", '{"name": "get_weather", "arguments": {"city": "X"}}', "\n</tool_call>")
    ] == [""] * 4
    assert watcher.finish()[1][0]["function"]["name"] == "get_weather"
    prose = tools.CallWatcher(use)
    assert [prose.push(p) for p in ("<", "b>bold", " text")] == ["", "<b>bold", " text"]
    assert prose.finish() == ("", [])


def test_every_family_grammar_compiles(tiny_llama_int4):
    """The grammar engine compiles each built-in family's call grammar (a family with a syntax it cannot take would
    only fail at a user's first request)."""
    from slmops import provided
    from slmops.runtime import Session

    session = Session(tiny_llama_int4.path)
    families = provided.template_families()
    assert len({f.tools for f in families}) >= 2
    for family in families:
        for choice in ("auto", "required"):
            session.check_constraint(tools.ToolUse.of([WEATHER, CLOCK], choice, family.tools).constraint())


def test_a_registered_folder_keeps_its_tool_syntax():
    from slmops.templates import ChosenTemplate, family_from_inference_model, inference_model

    llama3 = family_by_name("llama3")
    written = inference_model("m", "", "1", ChosenTemplate(llama3, "detected", None))
    assert family_from_inference_model(written).family.tools == llama3.tools != HERMES
    del written["slmops"]["tools"]  # a folder registered before slmops kept it: its family's syntax
    assert family_from_inference_model(written).family.tools == llama3.tools
    written["slmops"]["family"] = "gone"
    assert family_from_inference_model(written).family.tools == HERMES
