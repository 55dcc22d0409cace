"""A domain set with structured rows (a JSON schema, tools), scored on the default model's int4 and on its source,
and validate's comparison of the two: the real build passes, a build whose template lost the question fails."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from slmops import templates
from slmops.measure import domain, quality
from slmops.measure.bench import reference_for
from slmops.measure.gate import domain_checks
from slmops.run.chat import OrtGenAIChat
from tests.test_serve import WEATHER

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30}},
    "required": ["city", "country"],
    "additionalProperties": False,
}
ROWS = [
    {"prompt": "What is the capital of France? Answer as JSON with the city and its country.",
     "expected": {"city": "Paris"}, "schema": CITY},
    {"prompt": "Which city is the capital of Japan? Reply in JSON.", "expected": {"city": "Tokyo"},
     "schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]}},
    *({"prompt": f"What is the weather in {city}?", "tools": [WEATHER], "tool_choice": "required",
       "expected": {"name": "get_weather", "arguments": {"city": city, "unit": "celsius"}}} for city in ("Paris", "London")),
    {"prompt": "Name the capital city of France.", "expected": "Paris"},
]  # fmt: skip


def test_shares_are_judged_against_the_source():
    source = {"accuracy": 0.8, "valid": 0.5, "fields": 1.0, "calls": None}
    checks = {
        c.check: c for c in domain_checks({"accuracy": 0.79, "valid": 0.2, "fields": 1.0, "source": source}, 0.02)
    }
    assert checks["domain set accuracy"].ok and not checks["domain set: valid structure"].ok
    assert checks["domain set: fields under the schema"].ok
    assert "domain set: tool calls" not in checks  # no row asked for one
    assert not domain_checks({"accuracy": 0.4}, 0.02)[0].ok  # no source measured: the fixed bar of 0.5
    assert domain_checks({"accuracy": 0.4, "source": {"accuracy": 0.41}}, 0.02)[0].ok


@pytest.mark.slow
def test_the_structure_check_passes_the_build_and_fails_a_broken_one(tmp_path):
    from slmops.build import convert

    build = Path(convert.convert(None, {"precision": "int4", "algorithm": "gguf"}).path)
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    rows = quality.load_set(path)
    source = domain.score(OrtGenAIChat(reference_for(build)), rows)
    assert source["fields"] == 1.0 and source["calls"] == 1.0  # the source answers this set
    real = domain.score(OrtGenAIChat(build), rows)
    real["source"] = source
    assert all(c.ok for c in domain_checks(real, 0.02)), domain_checks(real, 0.02)
    call = next(r["call"] for r in real["results"] if "call" in r)
    assert json.loads(call["arguments"]) == {"city": "Paris", "unit": "celsius"}
    # the same weights with a template that drops the user's words: it answers, in form, the wrong things
    broken = tmp_path / "broken"
    shutil.copytree(build, broken)
    manifest = templates.inference_model("broken", "", "1", templates.choose(broken))  # as register writes it
    manifest["PromptTemplate"]["prompt"] = "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"
    (broken / "inference_model.json").write_text(json.dumps(manifest))
    wrong = domain.score(OrtGenAIChat(broken), rows)
    wrong["source"] = source
    failed = {c.check for c in domain_checks(wrong, 0.02) if not c.ok}
    assert {"domain set: fields under the schema", "domain set: tool calls"} <= failed
