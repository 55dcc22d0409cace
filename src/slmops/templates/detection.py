"""Which prompt-template family a model folder speaks: the one named, the one detected from its chat template,
model type and special tokens, or one derived from its chat template; and the default system text it adds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from slmops.errors import SlmopsError
from slmops.host.reading import read_text_limited  # bounded: a link to /dev/zero or a huge file is refused, not read
from slmops.plugin.roles import CHAT_DEFAULTS, ModelInfo, TemplateFamily
from slmops.templates.rendering import CONVERSATIONS, render, tokenizer_render

ADD_FAMILY_HINT = "pass --family NAME, or add a family with a plugin (docs/plugins.md)"


@dataclasses.dataclass
class ChosenTemplate:
    family: TemplateFamily
    how: str  # "given", "detected" or "derived from the tokenizer's chat template"
    default_system: str | None = None  # what the model's own template adds when no system message is given


def read_model_info(path: Path) -> ModelInfo:
    """config.json and tokenizer files of a checkpoint or an ORT GenAI folder."""

    def load(name: str) -> dict[str, Any]:
        if not (path / name).exists():
            return {}
        try:
            return json.loads(read_text_limited(path / name, name))
        except ValueError:
            return {}

    config, tok = load("config.json"), load("tokenizer_config.json")
    template = None
    if (path / "chat_template.jinja").is_file():
        template = read_text_limited(path / "chat_template.jinja", "chat_template.jinja")
    elif isinstance(tok.get("chat_template"), str):
        template = tok["chat_template"]
    elif isinstance(tok.get("chat_template"), list):
        template = next((t["template"] for t in tok["chat_template"] if t.get("name") == "default"), None)
    special = {
        v["content"]
        for v in (tok.get("added_tokens_decoder") or {}).values()
        if isinstance(v, dict) and v.get("special")
    }
    tj = load("tokenizer.json")
    special |= {t["content"] for t in tj.get("added_tokens", []) if t.get("special")}

    def token(key: str) -> str | None:
        v = tok.get(key)
        return v.get("content") if isinstance(v, dict) else v

    # A converted folder has no config.json; its genai_config.json names the same model type.
    model_type = config.get("model_type") or load("genai_config.json").get("model", {}).get("type", "")
    return ModelInfo(
        path=path,
        model_type=model_type,
        architectures=config.get("architectures") or [],
        chat_template=template,
        special_tokens=special,
        bos_token=token("bos_token"),
        eos_token=token("eos_token"),
    )


def family_by_name(name: str) -> TemplateFamily:
    from slmops.plugin import provided  # not at import: importing templates must not need the plugin machinery

    return provided.by_name(provided.template_families(), name, "template family")


def detect(info: ModelInfo) -> TemplateFamily | None:
    from slmops.plugin import provided

    scored = [(provided.safely(f, "score", info, fallback=0), f) for f in provided.template_families()]
    scored = [s for s in scored if isinstance(s[0], (int, float)) and s[0] > 0]
    return max(scored, key=lambda s: s[0])[1] if scored else None


def choose(path: Path, family: str = "auto") -> ChosenTemplate:
    """The template for a model folder: the named family, else the detected one, else one derived from the
    tokenizer's own chat template; an error when there is nothing to go on."""
    info = read_model_info(path)
    if family not in ("auto", "", None):
        chosen = ChosenTemplate(family_by_name(family), "given")
    elif (found := detect(info)) is not None:
        chosen = ChosenTemplate(found, "detected")
    elif info.chat_template:
        chosen = ChosenTemplate(derive_family(info), "derived from the tokenizer's chat template")
    else:
        from slmops.plugin import provided

        known = ", ".join(f.name for f in provided.template_families())
        raise SlmopsError(
            f"cannot tell the prompt format of {path}: no known family matches and it has no chat template; "
            f"known families: {known}; {ADD_FAMILY_HINT}"
        )
    if info.chat_template:
        chosen.default_system = learn_default_system(info, chosen.family)
    return chosen


def learn_default_system(info: ModelInfo, family: TemplateFamily) -> str | None:
    """The system text the model's template inserts when none is given (SmolLM2, Qwen2.5 do)."""
    conv = CONVERSATIONS["user only"]
    try:
        theirs = tokenizer_render(info, conv)
    except Exception:
        return None
    if theirs == render(family, conv):
        return None
    pre, _, post = family.system.partition("{Content}")
    head = family.bos + pre
    if not theirs.startswith(head) or not post:
        return None
    end = theirs.find(post, len(head))
    if end < 0:
        return None
    candidate = theirs[len(head) : end]
    return candidate if render(family, conv, candidate) == theirs else None


def derive_family(info: ModelInfo) -> TemplateFamily:
    """A PromptTemplate read off the tokenizer's chat template by rendering marker texts through it."""
    S, U1, A1, U2 = "\x01SYS\x01", "\x01U1\x01", "\x01A1\x01", "\x01U2\x01"
    try:
        a = tokenizer_render(info, [{"role": "user", "content": U1}], False)
        b = tokenizer_render(info, [{"role": "user", "content": U1}, {"role": "assistant", "content": A1}], False)
        c = tokenizer_render(info, [{"role": "user", "content": U1}], True)
        d = tokenizer_render(
            info,
            [{"role": "user", "content": U1}, {"role": "assistant", "content": A1}, {"role": "user", "content": U2}],
            False,
        )
        try:
            e = tokenizer_render(info, [{"role": "system", "content": S}, {"role": "user", "content": U1}], False)
        except Exception:
            e = None
    except Exception as err:
        raise SlmopsError(
            f"cannot derive a prompt template from {info.path}'s chat template ({err}); {ADD_FAMILY_HINT}"
        ) from None
    if not (b.startswith(a) and d.startswith(b) and c.startswith(a)):
        raise SlmopsError(
            f"{info.path}'s chat template is not turn-by-turn (earlier turns change with later ones); {ADD_FAMILY_HINT}"
        )
    user = d[len(b) :].replace(U2, "{Content}")
    assistant = b[len(a) :].replace(A1, "{Content}")
    prompt = user + c[len(a) :]
    user_u1 = user.replace("{Content}", U1)
    head = a[: len(a) - len(user_u1)] if a.endswith(user_u1) else ""
    system, bos = "", head
    if e is not None and e.endswith(user_u1):
        sys_part = e[: len(e) - len(user_u1)]
        bos = head if sys_part.startswith(head) and S not in head else ""
        system = sys_part[len(bos) :].replace(S, "{Content}")
    return TemplateFamily(
        name="derived",
        description=f"derived from {info.path.name}'s chat template",
        bos=bos,
        system=system,
        user=user,
        assistant=assistant,
        prompt=prompt,
        stop=[info.eos_token] if info.eos_token else [],
        model_config=dict(CHAT_DEFAULTS),
    )
