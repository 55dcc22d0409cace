"""Build corpus.jsonl, the text slmops scores quality on: English prose (the Python reference documentation that
CPython ships as pydoc_data.topics), Python source code (modules of the standard library) and dialogue written for
slmops (dialogue.txt beside this file). Run once with the interpreter whose stdlib you want; the output is committed
so every machine scores the same text. PSF License for the first two; the dialogue is this project's own."""

import inspect
import json
import sys
from pathlib import Path

import pydoc_data.topics as topics

# About 24k tokens (SmolLM2's tokenizer): 15k prose, 7.6k code, 1.5k dialogue.
PROSE = [
    "execmodel",
    "naming",
    "exceptions",
    "import",
    "objects",
    "truth",
    "context-managers",
    "floating",
    "customization",
    "class",
    "with",
    "try",
]
CODE = ["textwrap", "bisect", "colorsys"]


def rows():
    for key in PROSE:
        if key in topics.topics:
            yield {"kind": "prose", "source": f"pydoc_data.topics[{key!r}]", "text": topics.topics[key].strip()}
    for name in CODE:
        module = __import__(name)
        yield {"kind": "code", "source": f"{name}.py", "text": inspect.getsource(module)}
    for i, dialogue in enumerate((Path(__file__).parent / "dialogue.txt").read_text().split("\n\n")):
        yield {"kind": "dialogue", "source": f"dialogue.txt#{i + 1}", "text": dialogue.strip()}


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "corpus.jsonl")
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows()))
