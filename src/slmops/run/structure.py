"""Structured output: a JSON schema (OpenAI's `response_format`, `model run --json-schema`) as the constraint ONNX
Runtime GenAI's grammar engine (LLGuidance) decodes under, and the check that an answer meets it.

The schema is checked twice before any token is generated: by `jsonschema` (is it a JSON schema at all) and by the
grammar engine itself (`runtime.Session.check_constraint`: does LLGuidance support every keyword it uses: it refuses
look-around in patterns, unknown formats, remote `$ref`s), so a request it cannot honour is refused, never answered
unconstrained."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.errors import SlmopsError
from slmops.host.reading import read_text_limited

SCHEMA_FILE_LIMIT = 1 << 20  # a schema file larger than this is not a schema
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintError(SlmopsError):
    """A schema that is not one, or that this engine cannot keep an answer to."""


@dataclass(frozen=True)
class Constraint:
    """What an answer must be. kind and grammar: the guidance ORT GenAI takes (`GeneratorParams.set_guidance`);
    schema: the JSON schema the whole answer validates against."""

    schema: dict[str, Any]
    kind: str = "json_schema"
    grammar: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.grammar:
            # LLGuidance lets JSON have any whitespace between tokens by default, and a small model that starts
            # padding never stops: SmolLM2 int4 wrote tabs until max_tokens on 1 of 50 prompts, also with a bounded
            # whitespace pattern (its runs chain). One line with ", " and ": " leaves whitespace no room to loop in.
            # A schema's own "x-guidance" wins.
            grammar = {"x-guidance": COMPACT, **self.schema}
            object.__setattr__(self, "grammar", json.dumps(grammar))

    def problem(self, answer: str) -> str | None:
        """Why answer does not meet the schema (None: it does)."""
        import jsonschema

        try:
            value = json.loads(answer)
        except ValueError as e:
            return f"not JSON ({e})"
        error = jsonschema.exceptions.best_match(
            jsonschema.validators.validator_for(self.schema)(self.schema).iter_errors(value)
        )
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path) or "the answer"
        return f"{where}: {error.message}"


JSON_OBJECT = Constraint({"type": "object"})  # response_format {"type": "json_object"}: any JSON object


def json_schema(schema: Any, what: str = "the JSON schema") -> Constraint:
    """A Constraint for schema, refused with one line when it is not a JSON schema."""
    import jsonschema

    if not isinstance(schema, dict):
        raise ConstraintError(f"{what} must be a JSON object, not {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise ConstraintError(
            f"{what} is not a valid JSON schema{' at ' + where if where else ''}: {e.message}"
        ) from None
    return Constraint(schema)


def read_json(path: Path, what: str) -> Any:
    """A small JSON file (a schema, a tools list), refused with one line when it is not one."""
    text = read_text_limited(Path(path), what, SCHEMA_FILE_LIMIT)
    try:
        return json.loads(text)
    except ValueError as e:
        raise ConstraintError(f"the {what} {path} is not JSON ({e})") from None


def read_schema(path: Path) -> Constraint:
    """A Constraint from a JSON schema file (`model run --json-schema FILE`)."""
    return json_schema(read_json(path, "JSON schema file"), f"the JSON schema in {path}")


def engine_refusal(engine: str) -> str:
    """The one line for an engine slmops cannot constrain."""
    return (
        f"the {engine} engine is not given JSON schemas by slmops, so it could not keep the answer to one;"
        " use the ort-genai engine (`slmops serve --engine ort-genai`), whose grammar engine does"
    )
