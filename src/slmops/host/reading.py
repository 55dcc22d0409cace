"""Bounded reads of the files slmops reads whole: a path given by mistake (/dev/zero, a huge file, a folder)
is refused in one line, never read into memory."""

from __future__ import annotations

import stat
from pathlib import Path

from slmops.errors import SlmopsError

# Config-like files slmops reads whole (slmops.toml, Olive JSON, a model's JSON configs): a real one is a few KB, a
# tokenizer.json a few MB. The limit keeps /dev/zero or a huge file given by mistake from filling memory.
READ_LIMIT = 64 << 20


def read_text_limited(path: Path, what: str, limit: int = READ_LIMIT) -> str:
    """A text file read whole, refused with one line when it is not a regular file or is larger than limit."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise SlmopsError(f"cannot read {what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SlmopsError(f"{what} {path} is not a regular file; give the path of a {what}")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise SlmopsError(f"{what} {path} is larger than {limit >> 20} MB; this is not a {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SlmopsError(f"{what} {path} is not UTF-8 text") from None
