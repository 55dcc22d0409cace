"""Registry: Foundry Local, through foundry-local-sdk's in-process runtime (no `foundry` CLI needed).

Models live in ``<root>/custom/<name>/`` (the guide's layout) with ``inference_model.json``; the runtime's own
record is ``<root>/foundry.local.modelinfo.json``. Every change happens under one inter-process lock with a
fresh SDK manager (one that reads the record as it is now), so concurrent slmops processes never overwrite each
other's registrations, whatever the SDK itself does across processes.

Never lose a registration: a replacement is written beside the old folder and registered once under a throwaway
trial id (the runtime parses genai_config.json then, and refuses a broken one) before the old one is touched; the
swap is two renames. A process killed at any point leaves a state that the next locked operation (reconcile) turns
back into "every record has a complete folder and every complete folder a record"."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slmops.api import (
    Registry,
    RegistryEntry,
    SlmopsError,
    clean_stale,
    copy_tree,
    dir_size,
    extra_problem,
    fault_point,
    hookimpl,
    lock,
    rename,
    replace_dir,
)

RECORD = "foundry.local.modelinfo.json"
ENTRY = "slmops-entry.json"
TRIAL = "slmops-trial-"  # + 64 hex digits: longer than any slmops name (64 at most), so never a user's model


def clean_message(error: BaseException) -> str:
    """The runtime's message without the C++ source location and signature it starts with."""
    text = " ".join(str(error).split())
    return re.sub(r"^[\w./-]+\.(?:cc|cpp|h):\d+\s+.*?\)\s+", "", text) or type(error).__name__


def load_sdk() -> None:
    """Import the SDK, onnxruntime_genai first: the SDK loads its own onnxruntime-genai-core native library,
    and onnxruntime_genai imported after it fails with an undefined symbol (seen with 0.14.1 and core 0.18).
    Without the SDK (slmops installed without its foundry extra): one line saying how to install it."""
    missing = extra_problem("foundry", "the Foundry Local registry")
    if missing:
        raise SlmopsError(missing)
    import onnxruntime_genai  # noqa: F401, I001  (this order matters: keep import sorters away)
    import foundry_local_sdk  # noqa: F401


def matching(catalog: Any, name: str) -> list[Any]:
    """Catalog models registered under name (alias) or with that id."""
    return [m for m in catalog.list_models() if m.alias == name or m.id == name]


class FoundryLocalRegistry(Registry):
    name = "foundry-local"
    description = "Foundry Local model cache and runtime (foundry-local-sdk)"
    # Its runtime keeps answers to a JSON schema or a lark grammar (LLGuidance, as ORT GenAI). Its own tool calling
    # (tools in the request) needs tool markers a bring-your-own model does not publish: see docs/user-guide.md.
    constrains = True
    _chat_root: Path | None = None  # the registry folder whose SDK manager loaded _chat_models
    _chat_models: dict[
        str, Any
    ] = {}  # name -> the model a chat loaded, kept for the next turn (replaced, never mutated)

    def default_location(self) -> Path:
        # Foundry Local's own cache, as `foundry cache location` reports it.
        return Path(os.environ.get("FOUNDRY_LOCAL_CACHE", Path.home() / ".foundry" / "cache")) / "models"

    def runtime_problem(self) -> str | None:
        try:
            load_sdk()  # loads the native runtime
        except SlmopsError as e:
            return str(e)
        except Exception as e:
            return f"foundry_local_sdk does not load: {type(e).__name__}: {e}"
        return None

    # -- the SDK manager ---------------------------------------------------------------------------------
    def _check_record(self) -> None:
        """Refuse to touch a damaged runtime record: the SDK could otherwise start an empty one."""
        record = self.root / RECORD
        if not record.exists():
            return
        try:
            data = json.loads(record.read_text())
            if not isinstance(data.get("models"), list):
                raise ValueError("no 'models' list")
        except (ValueError, OSError) as e:
            backup = record.with_suffix(".json.bak")
            fix = (
                f"restore it with `cp {backup} {record}`"
                if backup.exists()
                else f"move it away and re-register the models in {self.root / 'custom'}"
            )
            raise SlmopsError(
                f"the Foundry Local registry record {record} is damaged ({e}); nothing was changed; {fix}"
            ) from None

    def _start(self) -> Any:
        """A fresh SDK manager on this registry's folder (the SDK allows one per process)."""
        load_sdk()
        from foundry_local_sdk import Configuration, FoundryLocalManager, LogLevel

        self.root.mkdir(parents=True, exist_ok=True)
        self._check_record()
        if FoundryLocalManager.instance is not None:
            FoundryLocalManager.instance.close()
        FoundryLocalManager.initialize(
            Configuration(
                app_name="slmops",
                model_cache_dir=str(self.root),
                app_data_dir=str(self.root / ".foundry-app"),
                logs_dir=str(self.root / ".foundry-logs"),
                log_level=LogLevel.ERROR,
            )
        )
        return FoundryLocalManager.instance

    @contextlib.contextmanager
    def _catalog(self) -> Iterator[Any]:
        manager = self._start()  # first: it says so in one line when the SDK is not installed
        from foundry_local_sdk import CatalogType

        try:
            yield manager.get_catalog(CatalogType.LOCAL)  # only LOCAL: the public catalog needs the network
        finally:
            manager.close()
            self._chat_root, self._chat_models = None, {}  # closing the manager unloads them

    @contextlib.contextmanager
    def _locked(self) -> Iterator[Any]:
        with lock(self.root / ".slmops-registry"), self._catalog() as catalog:
            self._reconcile(catalog)
            yield catalog
            record = self.root / RECORD
            if record.exists():
                shutil.copy2(record, record.with_suffix(".json.bak"))  # the last good record, for repairs

    def _reconcile(self, catalog: Any) -> None:
        """Finish or undo what a killed slmops process left (we hold the lock, so no live one is at work)."""
        for m in catalog.list_models():
            if m.id.startswith(TRIAL):
                catalog.unregister_model(m.id)
        custom = self.root / "custom"
        clean_stale(custom)  # half-written folders go; a folder moved aside for a replacement comes back
        aliases = {m.alias for m in catalog.list_models()}
        for folder in sorted(custom.iterdir()) if custom.is_dir() else []:
            if folder.name.startswith(".") or folder.name in aliases or not (folder / ENTRY).is_file():
                continue
            # A complete folder of ours without a record: killed between unregistering the old and registering
            # this one. Both were validated, so register what is on disk.
            try:
                self._register(catalog, folder, json.loads((folder / ENTRY).read_text())["id"], folder.name)
            except (ValueError, KeyError, SlmopsError):
                continue

    @staticmethod
    def _register(catalog: Any, folder: Path, model_id: str, display_name: str) -> None:
        from foundry_local_sdk import ModelInfoBuilder

        info = ModelInfoBuilder().set_string_property("task", "chat-completion")
        info.set_string_property("display_name", display_name)
        try:
            catalog.register_model(model_path=str(folder), model_id=model_id, metadata=info)
        except Exception as e:
            raise SlmopsError(
                f"Foundry Local refused {display_name}: {clean_message(e)}; "
                "check the folder's genai_config.json (convert the model again with `slmops convert`)"
            ) from None

    # -- the role ----------------------------------------------------------------------------------------
    def register(self, model_dir: Path, entry: RegistryEntry, inference_model: dict, replace: bool) -> RegistryEntry:
        target = self.root / "custom" / entry.name
        entry.path = str(target)
        with self._locked() as catalog:
            existing = matching(catalog, entry.name) + matching(catalog, entry.id)
            if (existing or target.exists()) and not replace:
                raise SlmopsError(
                    f"{entry.name} is already registered; pass --replace to replace it, or choose another --name"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            staged = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{entry.name}.partial-{os.getpid()}-"))
            try:
                copy_tree(Path(model_dir), staged, skip=("inference_model.json", ENTRY))
                (staged / "inference_model.json").write_text(json.dumps(inference_model, indent=2) + "\n")
                (staged / ENTRY).write_text(json.dumps(entry.__dict__, indent=2) + "\n")
                fault_point("register:staged")
                trial = TRIAL + uuid.uuid4().hex + uuid.uuid4().hex + ":1"
                self._register(catalog, staged, trial, entry.name)  # refused here: the old one is untouched
                fault_point("register:trial")
                catalog.unregister_model(trial)
                try:
                    for m in {m.id: m for m in existing}.values():
                        catalog.unregister_model(m.id)
                    fault_point("register:unregistered")
                    replace_dir(staged, target)  # undoes itself if the second rename fails
                    fault_point("register:swapped")
                    self._register(catalog, target, entry.id, entry.name)
                except BaseException:
                    self._reconcile(catalog)  # whichever folder is at target gets its record back
                    raise
            finally:
                shutil.rmtree(staged, ignore_errors=True)
        return entry

    def list(self) -> list[RegistryEntry]:
        if not (self.root / RECORD).exists():
            self._check_record()
            return []
        with self._locked() as catalog:
            models = [(m.id, m.alias, m.get_path()) for m in catalog.list_models()]
        entries = []
        for model_id, alias, path in models:
            folder = Path(path) if path else self.root / "custom" / alias  # the runtime says '' when it is gone
            try:
                data = json.loads((folder / ENTRY).read_text())
                entry = RegistryEntry(**{k: v for k, v in data.items() if k in RegistryEntry.__dataclass_fields__})
            except (OSError, ValueError, TypeError):  # registered by something else than slmops, or deleted
                entry = RegistryEntry(name=alias, id=model_id, path=str(folder), registry=self.name)
            entry.path = str(folder)
            entry.status = "ok" if (folder / "genai_config.json").is_file() else "missing"
            entry.size_bytes = dir_size(folder) if entry.status == "ok" else 0
            entries.append(entry)
        return sorted(entries, key=lambda e: e.name)

    def remove(self, name: str) -> None:
        target = self.root / "custom" / name
        with self._locked() as catalog:
            for m in matching(catalog, name):
                catalog.unregister_model(m.id)
            fault_point("remove:unregistered")
            if target.is_dir():
                # Aside first (a name clean_stale removes), so a kill cannot leave a folder that looks registered.
                doomed = target.with_name(f".{name}.partial-{os.getpid()}-removing")
                rename(target, doomed)
                fault_point("remove:moved-aside")
                shutil.rmtree(doomed)

    def chat(
        self, name: str, messages: list[dict[str, str]], options: dict[str, Any], usage: dict[str, int]
    ) -> Iterator[str]:
        load_sdk()
        from foundry_local_sdk import ChatSession, MessageItem, Request, RequestOptions, SearchOptions
        from foundry_local_sdk.items import TextItem, TextItemType

        model = self._loaded(name)
        temperature = float(options.get("temperature") or 0.0)
        constraint = options.get("constraint")
        try:
            # Every native object released as soon as it is done with (with-blocks), not when collected.
            with ChatSession(model) as session, Request() as request:
                session.set_streaming(True)
                if constraint is None:
                    session.set_options(
                        RequestOptions(
                            search=SearchOptions(
                                max_output_tokens=int(options.get("max_new_tokens") or 256),
                                temperature=temperature,
                                top_p=options.get("top_p"),
                                seed=options.get("seed"),
                                do_sample=temperature > 0,
                            )
                        )
                    )
                    for m in messages:
                        request.add_item(getattr(MessageItem, m["role"])(m["content"]))
                else:  # the runtime's OpenAI request: the only way in for a response_format (a schema, a grammar)
                    body = openai_request(model.id, messages, options, constraint)
                    request.add_item(TextItem(json.dumps(body), TextItemType.OPENAI_JSON))
                with session.process_streaming_request(request) as response:
                    for item in response:
                        with item:
                            text = _text_of(item) if constraint is None else _delta_of(item.text)
                        if text:
                            yield text
                    with response.final_response as final:
                        tokens = final.get_usage()
        except SlmopsError:
            raise
        except Exception as e:
            raise SlmopsError(
                f"Foundry Local could not answer with {name}: {clean_message(e)}; "
                "`--engine ort-genai` runs the model with slmops's checked template instead"
            ) from None
        usage.update(prompt_tokens=tokens.prompt_tokens, completion_tokens=tokens.completion_tokens)

    def load(self, name: str) -> bool:
        self._loaded(name)
        return True

    def _loaded(self, name: str) -> Any:
        """The model, loaded once per process: a multi-turn chat, or a server with several models, pays the SDK
        start and each model's load once."""
        load_sdk()
        from foundry_local_sdk import CatalogType, FoundryLocalManager

        if self._chat_root == self.root and name in self._chat_models:
            return self._chat_models[name]
        if self._chat_root != self.root:
            manager = self._start()
            self._chat_root, self._chat_models = self.root, {}
        else:
            manager = FoundryLocalManager.instance  # keep the models already loaded by it
        found = matching(manager.get_catalog(CatalogType.LOCAL), name)
        if not found:
            raise SlmopsError(f"{name} is not registered with Foundry Local at {self.root}")
        model = found[0]
        try:
            model.load()
        except Exception as e:
            raise SlmopsError(
                f"Foundry Local could not load {name}: {clean_message(e)}; "
                f"check {self.root / 'custom' / name} or register the model again"
            ) from None
        self._chat_models = {**self._chat_models, name: model}
        return model


def openai_request(
    model_id: str, messages: list[dict[str, str]], options: dict[str, Any], constraint: Any
) -> dict[str, Any]:
    """An OpenAI chat request for the runtime, with the constraint as its response_format: a JSON schema as an object
    (a schema sent as a string, as the SDK's own ChatClient sends it, is refused by the 2.2.1 runtime), a lark grammar
    as text (tool calls: slmops describes the tools and parses the calls)."""
    temperature = float(options.get("temperature") or 0.0)
    if constraint.kind == "json_schema":
        response_format = {"type": "json_schema", "json_schema": json.loads(constraint.grammar)}
    else:
        response_format = {"type": constraint.kind, constraint.kind: constraint.grammar}
    body = {
        "model": model_id,
        "messages": messages,
        "stream": True,
        "max_tokens": int(options.get("max_new_tokens") or 256),
        "temperature": temperature,
        "response_format": response_format,
    }
    if temperature > 0 and options.get("top_p") is not None:
        body["top_p"] = float(options["top_p"])
    if options.get("seed") is not None:
        body["metadata"] = {"random_seed": str(int(options["seed"]))}
    return body


def _delta_of(chunk: str) -> str:
    """The text of one streamed OpenAI chunk."""
    choices = json.loads(chunk).get("choices") or [{}]
    return (choices[0].get("delta") or {}).get("content") or ""


def _text_of(item: Any) -> str:
    if hasattr(item, "get_simple_text"):
        try:
            return item.get_simple_text()
        except Exception:
            pass
    if hasattr(item, "parts"):
        return "".join(_text_of(p) for p in item.parts)
    return getattr(item, "text", "") or ""


@hookimpl
def register_registries(register):
    register(FoundryLocalRegistry())
