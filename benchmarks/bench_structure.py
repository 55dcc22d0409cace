"""What constrained decoding costs: decode tok/s under a JSON schema against free decoding, for slmops (ORT GenAI's
grammar engine, LLGuidance) and llama.cpp (its GBNF grammar from the same schema, llama-cpp-python) side by side.

The default model: slmops's int4 build that `make demo` deploys, and the embedded Q4_1 GGUF it came from for
llama.cpp. The same prompts, greedy, free and constrained interleaved, ROUNDS rounds; decode speed is the tokens
after the first over the time after the first (prefill and grammar compilation left out, as a server reports them).
Also the same build registered with Foundry Local and run through its runtime (`--engine registry`), whose own
LLGuidance keeps the answer to the schema. Printed: median decode tok/s free and constrained, their ratio (issue 29
asks >= 0.85 for slmops), and how many constrained answers validated."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "category": {"type": "string", "enum": ["animal", "place", "food", "object", "person"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 1000},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["name", "category", "count", "tags"],
    "additionalProperties": False,
}
PROMPTS = [
    "Describe a cat.",
    "Tell me about Paris.",
    "Give a record for bread.",
    "Who was Mozart?",
    "Classify a whale.",
]
ROUNDS, MAX_TOKENS = 3, 96


def timed(pieces: Iterator[str]) -> tuple[str, float | None]:
    """The answer and its decode tok/s (pieces after the first over the time after the first)."""
    first = None
    count = 0
    parts = []
    for piece in pieces:
        count += 1
        parts.append(piece)
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return "".join(parts), ((count - 1) / (end - first) if count > 2 and end > first else None)


def slmops_runner() -> Callable[[str, bool], tuple[str, float | None]]:
    from slmops.build import candidates, convert
    from slmops.run import structure
    from slmops.run.chat import OrtGenAIChat

    build = convert.convert(None, dict(candidates.CANDIDATES)["int4 gguf"])
    chat = OrtGenAIChat(build.path)
    constraint = structure.json_schema(SCHEMA)

    def run(prompt: str, constrained: bool) -> tuple[str, float | None]:
        options = {"temperature": 0, "max_new_tokens": MAX_TOKENS}
        if constrained:
            options["constraint"] = constraint
        return timed(chat.stream([{"role": "user", "content": prompt}], options, {}))

    return run


def foundry_runner(folder: str) -> Callable[[str, bool], tuple[str, float | None]]:
    """The same build registered with Foundry Local (in folder) and run through its runtime's grammar engine."""
    from pathlib import Path

    from slmops import templates
    from slmops.api import RegistryEntry
    from slmops.build import candidates, convert
    from slmops.plugins.foundry_local import FoundryLocalRegistry
    from slmops.run import structure

    build = Path(convert.convert(None, dict(candidates.CANDIDATES)["int4 gguf"]).path)
    registry = FoundryLocalRegistry()
    registry.root = Path(folder)
    doc = templates.inference_model("bench", "", "1", templates.choose(build))
    registry.register(build, RegistryEntry(name="bench", id="bench:1", path=""), doc, True)
    constraint = structure.json_schema(SCHEMA)

    def run(prompt: str, constrained: bool) -> tuple[str, float | None]:
        options = {"temperature": 0, "max_new_tokens": MAX_TOKENS, "constraint": constraint if constrained else None}
        return timed(registry.chat("bench", [{"role": "user", "content": prompt}], options, {}))

    return run


def llama_runner() -> Callable[[str, bool], tuple[str, float | None]] | None:
    try:
        import llama_cpp
        from llama_cpp.llama_grammar import LlamaGrammar
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp rows (make bench installs it)", file=sys.stderr)
        return None
    from slmops.build import sources
    from slmops.host.cpus import allowed_cpus

    llm = llama_cpp.Llama(str(sources.default_gguf()), n_ctx=2048, n_threads=allowed_cpus(), verbose=False)
    grammar = LlamaGrammar.from_json_schema(json.dumps(SCHEMA), verbose=False)

    def run(prompt: str, constrained: bool) -> tuple[str, float | None]:
        chunks = llm.create_chat_completion(
            [{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=MAX_TOKENS,
            stream=True,
            grammar=grammar if constrained else None,
        )
        return timed(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])

    return run


def measure(label: str, run: Callable[[str, bool], tuple[str, float | None]]) -> dict:
    import jsonschema

    speeds: dict[bool, list[float]] = {False: [], True: []}
    valid = total = 0
    run(PROMPTS[0], True)  # warm: the model's first run and the grammar engine's tokenizer tables
    for _ in range(ROUNDS):
        for prompt in PROMPTS:
            for constrained in (False, True):
                answer, speed = run(prompt, constrained)
                if speed:
                    speeds[constrained].append(speed)
                if constrained:
                    total += 1
                    try:
                        jsonschema.validate(json.loads(answer), SCHEMA)
                        valid += 1
                    except (ValueError, jsonschema.ValidationError):
                        pass
    free, bound = statistics.median(speeds[False]), statistics.median(speeds[True])
    return {"engine": label, "free_tok_s": free, "constrained_tok_s": bound, "ratio": bound / free, "valid": valid,
            "answers": total}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    rows = [measure("slmops (ORT GenAI + LLGuidance)", slmops_runner())]
    with tempfile.TemporaryDirectory(prefix="bench-structure-foundry-") as folder:
        rows.append(measure("slmops --engine registry (Foundry Local)", foundry_runner(folder)))
    if (llama := llama_runner()) is not None:
        rows.append(measure("llama.cpp (GBNF from the schema)", llama))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'engine':<42}{'free tok/s':>11}{'schema tok/s':>13}{'ratio':>7}{'valid':>9}")
    for r in rows:
        print(
            f"{r['engine']:<42}{r['free_tok_s']:>11.1f}{r['constrained_tok_s']:>13.1f}{r['ratio']:>6.2f}x"
            f"{r['valid']:>5}/{r['answers']}"
        )


if __name__ == "__main__":
    main()
