"""Control tokens in user text: the strings that open or close a turn, broken so they tokenize as plain text."""

from __future__ import annotations

from slmops.plugin.roles import ModelInfo, TemplateFamily


def control_tokens(family: TemplateFamily, info: ModelInfo | None = None) -> set[str]:
    """Strings that open or close turns: user text must never contain them verbatim."""
    tokens = {m for m in family.markers} | set(family.stop)
    if family.bos:
        tokens.add(family.bos)
    if info:
        tokens |= {t for t in info.special_tokens if len(t) > 2}
    return {t for t in tokens if t}


def neutralize(text: str, tokens: set[str]) -> str:
    """Break each control token in user text with a space after its first character, so it tokenizes as plain
    text. A plain ASCII space: visible to the user, and split the same way by every tokenizer."""
    for tok in sorted(tokens, key=len, reverse=True):
        if tok in text:
            text = text.replace(tok, tok[0] + " " + tok[1:])
    return text
