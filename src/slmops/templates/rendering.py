"""Prompts as text: slmops's rendering from a family's PromptTemplate, the model's own chat template (the Jinja
environment transformers uses), the runtime's rendering, and a chat_template.jinja written for a model without one."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from slmops.errors import SlmopsError
from slmops.plugin.roles import ModelInfo, TemplateFamily

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


def tokenizer_render(
    info: ModelInfo, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **context: Any
) -> str:
    """The prompt as the model's own chat template writes it (context: more variables, such as tools, passed to
    the template as transformers passes them)."""
    if not info.chat_template:
        raise SlmopsError(f"{info.path} has no chat template")
    return _jinja_template(info.chat_template).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=info.bos_token or "",
        eos_token=info.eos_token or "",
        **context,
    )


@lru_cache(maxsize=8)
def takes_tools(source: str | None) -> bool:
    """Whether a chat template reads the `tools` variable (Qwen2.5's, Llama 3.1's, Mistral's do; SmolLM2's does not)."""
    if not source:
        return False
    from jinja2 import TemplateSyntaxError, meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        return "tools" in meta.find_undeclared_variables(ImmutableSandboxedEnvironment().parse(source))
    except TemplateSyntaxError:
        return False


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
    from slmops.run.runtime import Session

    return Session(model_dir, "none").tokenizer.apply_chat_template(
        messages=json.dumps(messages), add_generation_prompt=add_generation_prompt
    )


def write_chat_template(model_dir: Path, family: TemplateFamily, default_system: str | None) -> dict[str, Any]:
    """Give a model without a chat template (a base model) its family's, as chat_template.jinja, and check that
    the runtime renders every test conversation exactly as slmops does; raises if it does not."""
    (model_dir / "chat_template.jinja").write_text(chat_template(family, default_system))
    for name, conv in CONVERSATIONS.items():
        theirs, ours = runtime_render(model_dir, conv), render(family, conv, default_system)
        if theirs != ours:
            from slmops.build.verify import first_difference

            pos = first_difference(ours, theirs)
            raise SlmopsError(
                f"the chat template slmops wrote for {family.name} renders '{name}' differently in ORT GenAI "
                f"at character {pos}: {ours[max(0, pos - 20) : pos + 20]!r} vs {theirs[max(0, pos - 20) : pos + 20]!r}; "
                "pass --family with another family"
            )
    return {"file": "chat_template.jinja", "family": family.name, "runtime_renders_the_same": len(CONVERSATIONS)}
