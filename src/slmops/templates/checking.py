"""Does slmops's rendering of a family's template say exactly what the model's own chat template says, as text and
as the tokens the runtime makes of it?"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from slmops.templates.detection import ChosenTemplate, read_model_info
from slmops.templates.rendering import CONVERSATIONS, render, tokenizer_render


@lru_cache(maxsize=4)
def _tokenizer(path: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def count_tokens(model_dir: Path, text: str) -> list[int]:
    return _tokenizer(str(model_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def prompt_tokenizer(path: Path) -> tuple[str, Any]:
    """How a rendered prompt becomes tokens where it is deployed: the runtime's own tokenizer in an ORT GenAI folder;
    in a checkpoint, the tokenizer.json it would get, with nothing added (which is what the runtime does)."""
    if (path / "genai_config.json").is_file():
        from slmops.run.runtime import Session

        return "ORT GenAI", Session(path, "none").tokens
    return "tokenizers", lambda text: count_tokens(path, text)


def fidelity(path: Path, chosen: ChosenTemplate) -> dict[str, Any]:
    """Render each conversation with the template and with the model's own chat template and compare the text;
    then compare the tokens the runtime makes of slmops's rendering with the source tokenizer's
    apply_chat_template(tokenize=True), BOS included, so a BOS missing or written twice is caught. Not checked
    when the model has no chat template or its template takes none of the conversations."""
    from transformers import AutoTokenizer

    from slmops.build.verify import first_difference

    info = read_model_info(path)
    if not info.chat_template:
        return {
            "ok": True,
            "checked": False,
            "reason": "the model has no chat template to compare with",
            "conversations": [],
        }
    tokenized_by, tokenize = prompt_tokenizer(path)
    source = AutoTokenizer.from_pretrained(path)
    results = []
    for name, conv in CONVERSATIONS.items():
        try:
            theirs = tokenizer_render(info, conv)
            their_tokens = list(
                source.apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=False)
            )
        except Exception as e:
            results.append({"conversation": name, "ok": True, "skipped": f"the model's template rejects it: {e}"})
            continue
        ours = render(chosen.family, conv, chosen.default_system)
        row: dict[str, Any] = {"conversation": name, "ok": ours == theirs, "tokens": len(their_tokens)}
        if (pos := first_difference(ours, theirs)) is not None:
            row.update(
                first_diff_char=pos,
                template=ours[max(0, pos - 20) : pos + 20],
                tokenizer=theirs[max(0, pos - 20) : pos + 20],
            )
        if (token := first_difference(tokenize(ours), their_tokens)) is not None:
            row.update(ok=False, first_diff_token=token)
        results.append(row)
    if all("skipped" in r for r in results):
        return {
            "ok": True,
            "checked": False,
            "reason": "the model's chat template takes none of the test conversations",
            "conversations": results,
        }
    return {
        "ok": all(r["ok"] for r in results),
        "checked": True,
        "tokenized_by": tokenized_by,
        "conversations": results,
    }
