"""Prompt templates: detect a model's family, render prompts, and check them against the tokenizer's own
chat template byte for byte and token for token."""

from __future__ import annotations

import dataclasses
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import SlmopsError
from .roles import CHAT_DEFAULTS, ModelInfo, TemplateFamily

Messages = list[dict[str, str]]

# The conversations every fidelity check renders both ways.
CONVERSATIONS: dict[str, Messages] = {
    "user only": [{"role": "user", "content": "What is the capital of France?"}],
    "system + user": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name a primary colour."},
    ],
    "multi-turn": [
        {"role": "user", "content": "Hi there."},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a short joke."},
    ],
}
ADD_FAMILY_HINT = "pass --family NAME, or add a family with a plugin (docs/plugins.md)"


@dataclasses.dataclass
class ChosenTemplate:
    family: TemplateFamily
    how: str  # "given", "detected" or "derived from the tokenizer's chat template"
    default_system: str | None = None  # what the model's own template adds when no system message is given


def read_model_info(path: Path) -> ModelInfo:
    """config.json and tokenizer files of a checkpoint or an ORT GenAI folder."""

    def load(name: str) -> dict[str, Any]:
        try:
            return json.loads((path / name).read_text())
        except (OSError, ValueError):
            return {}

    config, tok = load("config.json"), load("tokenizer_config.json")
    template = None
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
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
    from . import implementations  # not at import: importing templates must not need the plugin machinery

    return implementations.by_name(implementations.template_families(), name, "template family")


def detect(info: ModelInfo) -> TemplateFamily | None:
    from . import implementations

    scored = [(f.score(info), f) for f in implementations.template_families()]
    scored = [s for s in scored if s[0] > 0]
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
        from . import implementations

        known = ", ".join(f.name for f in implementations.template_families())
        raise SlmopsError(
            f"cannot tell the prompt format of {path}: no known family matches and it has no chat template; "
            f"known families: {known}; {ADD_FAMILY_HINT}"
        )
    if info.chat_template:
        chosen.default_system = learn_default_system(info, chosen.family)
    return chosen


def render(
    family: TemplateFamily, messages: Messages, default_system: str | None = None, add_generation_prompt: bool = True
) -> str:
    """The exact prompt text for a conversation, built from the family's PromptTemplate fields."""
    messages = list(messages)
    if default_system is not None and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": default_system})
    if family.system_in_first_user and messages and messages[0]["role"] == "system":
        system = messages.pop(0)["content"]
        if messages and messages[0]["role"] == "user":
            merged = family.system_in_first_user.replace("{System}", system).replace(
                "{Content}", messages[0]["content"]
            )
            messages[0] = {"role": "user", "content": merged}
    out = [family.bos]
    last = len(messages) - 1
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "user" and i == last and add_generation_prompt:
            fmt = family.prompt
        elif role in ("system", "user", "assistant"):
            fmt = getattr(family, role)
        else:
            raise SlmopsError(f"unknown message role {role!r}; use system, user or assistant")
        out.append(fmt.replace("{Content}", m["content"]))
    return "".join(out)


@lru_cache(maxsize=8)
def _jinja_template(source: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ValueError(message)

    # The same environment transformers uses for chat templates.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)
    return env.from_string(source)


def tokenizer_render(info: ModelInfo, messages: Messages, add_generation_prompt: bool = True) -> str:
    """The prompt as the model's own chat template writes it."""
    if not info.chat_template:
        raise SlmopsError(f"{info.path} has no chat template")
    return _jinja_template(info.chat_template).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=info.bos_token or "",
        eos_token=info.eos_token or "",
    )


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
        from .runtime import Session

        return "ORT GenAI", Session(path, "none").tokens
    return "tokenizers", lambda text: count_tokens(path, text)


def fidelity(path: Path, chosen: ChosenTemplate) -> dict[str, Any]:
    """Render each conversation with the template and with the model's own chat template and compare the text;
    then compare the tokens the runtime makes of slmops's rendering with the source tokenizer's
    apply_chat_template(tokenize=True), BOS included, so a BOS missing or written twice is caught. Not checked
    when the model has no chat template or its template takes none of the conversations."""
    from transformers import AutoTokenizer

    from .verify import first_difference

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


def chat_template(family: TemplateFamily, default_system: str | None = None) -> str:
    """A Jinja chat template that writes exactly what render() writes, for a model that came without one (a base
    model): ORT GenAI and so Foundry Local read chat_template.jinja, and refuse to chat without it."""
    fold = family.system_in_first_user

    def text(fmt: str, **names: str) -> str:  # "a{Content}b" -> "'a' + content + 'b'", as a Jinja expression
        parts = re.split(r"(\{Content\}|\{System\})", fmt)
        out = [names[p[1:-1].lower()] if p in ("{Content}", "{System}") else literal(p) for p in parts if p]
        return " + ".join(out) or "''"

    turn = (
        "{%- if m['role'] == 'user' and loop.last and add_generation_prompt -%}{{ "
        + text(family.prompt, content="content")
        + " }}"
        "{%- elif m['role'] == 'user' -%}{{ " + text(family.user, content="content") + " }}"
        "{%- elif m['role'] == 'assistant' -%}{{ " + text(family.assistant, content="content") + " }}"
        "{%- elif m['role'] == 'system' -%}{{ " + text(family.system, content="content") + " }}"
        "{%- endif -%}"
    )
    default = "none" if default_system is None else literal(default_system)
    head = (
        "{{- " + literal(family.bos) + " -}}"
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
        "{%- set rest = messages[1:] -%}{%- else -%}{%- set system = "
        + default
        + " -%}{%- set rest = messages -%}{%- endif -%}"
    )
    if fold:  # no system role: the system text goes into the first user turn, or nowhere
        merge = text(fold, system="system", content="m['content']")
        body = (
            "{%- for m in rest -%}{%- set content = m['content'] -%}"
            "{%- if loop.first and system is not none and m['role'] == 'user' -%}{%- set content = "
            + merge
            + " -%}{%- endif -%}"
            + turn
            + "{%- endfor -%}"
        )
    else:
        body = (
            "{%- if system is not none -%}{{ " + text(family.system, content="system") + " }}{%- endif -%}"
            "{%- for m in rest -%}{%- set content = m['content'] -%}" + turn + "{%- endfor -%}"
        )
    return head + body


def literal(value: str) -> str:
    """A Jinja string literal (the escapes both transformers' Jinja and ORT GenAI's read)."""
    escaped = (
        value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    )
    return "'" + escaped + "'"


def runtime_render(model_dir: Path, messages: Messages, add_generation_prompt: bool = True) -> str:
    """The prompt as the deployed runtime (ORT GenAI, as in Foundry Local) renders it from the folder's template."""
    from .runtime import Session

    return Session(model_dir, "none").tokenizer.apply_chat_template(
        messages=json.dumps(messages), add_generation_prompt=add_generation_prompt
    )


def write_chat_template(model_dir: Path, chosen: ChosenTemplate) -> dict[str, Any]:
    """Give a model without a chat template (a base model) its family's, as chat_template.jinja, and check that
    the runtime renders every test conversation exactly as slmops does; raises if it does not."""
    (model_dir / "chat_template.jinja").write_text(chat_template(chosen.family, chosen.default_system))
    for name, conv in CONVERSATIONS.items():
        theirs, ours = runtime_render(model_dir, conv), render(chosen.family, conv, chosen.default_system)
        if theirs != ours:
            from .verify import first_difference

            pos = first_difference(ours, theirs)
            raise SlmopsError(
                f"the chat template slmops wrote for {chosen.family.name} renders '{name}' differently in ORT GenAI "
                f"at character {pos}: {ours[max(0, pos - 20) : pos + 20]!r} vs {theirs[max(0, pos - 20) : pos + 20]!r}; "
                "pass --family with another family"
            )
    return {"file": "chat_template.jinja", "family": chosen.family.name, "runtime_renders_the_same": len(CONVERSATIONS)}


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


def inference_model(name: str, description: str, version: str, chosen: ChosenTemplate) -> dict[str, Any]:
    """The guide's inference_model.json, plus what slmops needs to run it the same way."""
    return {
        "Name": name,
        "Description": description,
        "Version": version,
        "PromptTemplate": chosen.family.prompt_template(),
        "ModelConfig": dict(chosen.family.model_config),
        "slmops": {
            "family": chosen.family.name,
            "how": chosen.how,
            "default_system": chosen.default_system,
            "bos": chosen.family.bos,
            "stop": chosen.family.stop,
            "markers": list(chosen.family.markers),
            "system_in_first_user": chosen.family.system_in_first_user,
        },
    }


def family_from_inference_model(data: dict[str, Any]) -> ChosenTemplate:
    """Rebuild the template a registered model was deployed with."""
    pt, extra = data["PromptTemplate"], data.get("slmops", {})
    fam = TemplateFamily(
        name=extra.get("family", "custom"),
        description="",
        system=pt.get("system", ""),
        user=pt["user"],
        assistant=pt.get("assistant", ""),
        prompt=pt["prompt"],
        stop=extra.get("stop", []),
        model_config=data.get("ModelConfig", {}),
        bos=extra.get("bos", ""),
        system_in_first_user=extra.get("system_in_first_user"),
        markers=tuple(extra.get("markers", ())),
    )
    return ChosenTemplate(fam, extra.get("how", "registered"), extra.get("default_system"))
