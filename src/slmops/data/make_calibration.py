"""Build calibration.txt, the text slmops calibrates quantizers on (never scored): the pydoc pages of eight
standard library modules, with memory addresses and the stdlib path taken out, cut at a line end after 110,000
characters (SmolLM2 needs about 104k of them for gptq's 24,576 calibration tokens). Rendered once, by CPython 3.11.7, and
committed: pydoc's text differs between Python releases (3.11.2 and 3.11.7 already differ in the first 20k
characters), and rendered at build time it gave each interpreter its own outlier channels. PSF License."""

import importlib
import pydoc
import re
import sys
import sysconfig
from pathlib import Path

MODULES = ("json", "argparse", "logging", "pathlib", "collections", "itertools", "functools", "csv")
LENGTH = 110_000

text = "\n\n".join(pydoc.render_doc(importlib.import_module(m), renderer=pydoc.plaintext) for m in MODULES)
text = re.sub(r" at 0x[0-9a-fA-F]+", "", text.replace(sysconfig.get_paths()["stdlib"], "<stdlib>"))
text = text[: text.index("\n", LENGTH) + 1]
Path(__file__).with_name("calibration.txt").write_text(text, encoding="utf-8")
print(f"calibration.txt: {len(text)} characters, Python {sys.version.split()[0]}", file=sys.stderr)
