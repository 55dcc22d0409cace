"""A plugin written exactly as a third party would: it depends on slmops and registers through its hooks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click

from slmops.api import Converter, OrtGenAIChat, Registry, RegistryEntry, TemplateFamily, hookimpl

# A made-up chat format, so detection can only find it through this plugin.
ZEPHYRISH = TemplateFamily(
    name="zephyrish",
    description="<|speaker:...|> turns, from the slmops-thirdparty test plugin",
    system="<|speaker:system|>\n{Content}</turn>\n",
    user="<|speaker:user|>\n{Content}</turn>\n",
    assistant="<|speaker:bot|>\n{Content}</turn>\n",
    prompt="<|speaker:user|>\n{Content}</turn>\n<|speaker:bot|>\n",
    stop=["</turn>"],
    model_config={"max_length": 512, "temperature": 0.5, "top_p": 0.9, "repetition_penalty": 1.0},
    markers=("<|speaker:", "</turn>"),
)

ZEPHYRISH_JINJA = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|speaker:bot|>\\n' + m['content'] + '</turn>\\n' }}"
    "{% else %}{{ '<|speaker:' + m['role'] + '|>\\n' + m['content'] + '</turn>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|speaker:bot|>\\n' }}{% endif %}"
)


class FailingConverter(Converter):
    """Writes part of a model, then fails: proves a failed build leaves nothing behind."""

    name = "failing"
    description = "writes half a model then raises (tests only)"
    precisions = ("fp32", "int4", "int8", "fp16")
    cost = 1000

    def check(self, request, architecture):
        return super().check(request, architecture) if architecture == "LlamaForCausalLM" else "llama only"

    def convert(self, request, output_dir: Path, work_dir: Path) -> None:
        (output_dir / "model.onnx").write_bytes(b"half")
        raise RuntimeError("the failing converter failed on purpose")


class FolderRegistry(Registry):
    """A registry that is only a folder with an index.json: not Foundry-shaped at all."""

    name = "folder"
    description = "index.json in a folder (tests only)"

    def default_location(self) -> Path:
        return Path.home() / ".slmops-folder-registry"

    def _index(self) -> dict:
        p = self.root / "index.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def register(self, model_dir, entry: RegistryEntry, inference_model: dict, replace: bool) -> RegistryEntry:
        index = self._index()
        target = self.root / entry.name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(model_dir, target)
        (target / "inference_model.json").write_text(json.dumps(inference_model))
        entry.path = str(target)
        index[entry.name] = entry.__dict__
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "index.json").write_text(json.dumps(index))
        return entry

    def list(self):
        return [RegistryEntry(**e) for e in self._index().values()]

    def remove(self, name: str) -> None:
        index = self._index()
        index.pop(name, None)
        shutil.rmtree(self.root / name, ignore_errors=True)
        (self.root / "index.json").write_text(json.dumps(index))


class RuntimeFolderRegistry(FolderRegistry):
    """The folder registry with a runtime of its own that has no grammar engine (constrains stays False): ORT
    GenAI, never given a constraint."""

    name = "folder-runtime"
    description = "index.json in a folder, with an unconstrained runtime (tests only)"

    def default_location(self) -> Path:
        return Path.home() / ".slmops-folder-runtime-registry"

    def load(self, name: str) -> bool:
        return True

    def chat(self, name, messages, options, usage):
        assert options.get("constraint") is None, "slmops gave a constraint to a registry that cannot keep it"
        yield from OrtGenAIChat(self.root / name).stream(messages, options, usage)


@hookimpl
def register_template_families(register):
    register(ZEPHYRISH)


@hookimpl
def register_converters(register):
    register(FailingConverter())


@hookimpl
def register_registries(register):
    register(FolderRegistry())
    register(RuntimeFolderRegistry())


@hookimpl
def register_commands(cli):
    @cli.command(name="hello-thirdparty")
    def hello():
        """Say hello from the third-party plugin."""
        click.echo("hello from slmops-thirdparty")
