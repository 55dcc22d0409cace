"""A user's domain set, answered greedily by a build and by its source, row by row.

Rows (JSONL, read by quality.load_set):
- {"prompt", "expected"}: the answer must contain expected (case-insensitive).
- {"prompt", "expected", "schema"}: a structured answer. valid: the model's own answer (no constraint: what an engine
  that cannot constrain would return) parses and validates; fields: the share of expected's fields (an object) that
  the answer under the schema (what `serve` returns with response_format) has equal; ok: all of them.
- {"prompt", "expected", "tools"}: a tool call. expected is {"name", "arguments"}; the call is made as `serve` makes it
  (the row's "tool_choice", default auto, under its grammar); valid: a call came; ok: the same function with equal arguments.
validate compares each share with the source's (its fp32 build, the same rows) rather than with a fixed bar."""

from __future__ import annotations

import json
from typing import Any

from slmops.run import structure, tools

MAX_NEW_TOKENS = 64
STRUCTURED_NEW_TOKENS = 160  # a JSON record or a call is longer than a short answer


def score(chat: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The set's shares (accuracy, valid, fields, calls: None where no row asks for it) and each row's result.
    chat: an OrtGenAIChat."""
    results = [score_row(chat, r) for r in rows if "prompt" in r]
    structured = [r for r in results if "valid" in r]
    with_fields = [r for r in results if "fields" in r]
    calls = [r for r in results if "call" in r]
    return {
        "rows": len(results),
        "accuracy": share(r["ok"] for r in results),
        "valid": share(r["valid"] for r in structured),
        "fields": sum(r["fields"] for r in with_fields) / len(with_fields) if with_fields else None,
        "calls": share(r["ok"] for r in calls),
        "results": results,
    }


def share(flags: Any) -> float | None:
    flags = list(flags)
    return sum(map(bool, flags)) / len(flags) if flags else None


def answer(
    chat: Any,
    messages: list[dict[str, Any]],
    constraint: Any = None,
    new: int = MAX_NEW_TOKENS,
    prompt: str | None = None,
) -> str:
    options = {"max_new_tokens": new, "temperature": 0, "constraint": constraint, "prompt": prompt}
    return "".join(chat.stream(messages, options, {}))


def score_row(chat: Any, row: dict[str, Any]) -> dict[str, Any]:
    asked = [{"role": "user", "content": row["prompt"]}]
    result: dict[str, Any] = {"prompt": row["prompt"], "expected": row["expected"]}
    if "tools" in row:
        use = tools.ToolUse.of(row["tools"], row.get("tool_choice", "auto"), chat.chosen.family.tools)
        plain, prompt = tools.conversation(asked, use, chat.chosen.family, chat.info)
        said = answer(chat, plain, use.constraint(), STRUCTURED_NEW_TOKENS, prompt)
        _, calls = use.parse(said)
        call = calls[0]["function"] if calls else None
        expected = row["expected"] if isinstance(row["expected"], dict) else {}
        result.update(answer=said, valid=bool(calls), call=call)
        result["ok"] = bool(
            call
            and call["name"] == expected.get("name")
            and json.loads(call["arguments"]) == expected.get("arguments", {})
        )
        return result
    if "schema" in row:
        constraint = structure.json_schema(row["schema"], "a domain set row's schema")
        free = answer(chat, asked, new=STRUCTURED_NEW_TOKENS)
        kept = answer(chat, asked, constraint, STRUCTURED_NEW_TOKENS)
        expected = row["expected"] if isinstance(row["expected"], dict) else json.loads(row["expected"])
        try:
            got = json.loads(kept)
        except ValueError:
            got = {}
        equal = sum(1 for k, v in expected.items() if isinstance(got, dict) and got.get(k) == v)
        result.update(
            answer=kept,
            free_answer=free,
            valid=constraint.problem(free) is None,
            fields=equal / len(expected) if expected else 1.0,
        )
        result["ok"] = result["fields"] == 1.0
        return result
    said = answer(chat, asked)
    result.update(answer=said, ok=str(row["expected"]).lower() in said.lower())
    return result
