"""`slmops deploy`: the deployment guide end to end, in the order the data goes. Convert (the fp32 reference and the
chosen build) -> package (template chosen and checked, inference_model.json, in a staged folder) -> validate the
staged folder -> register it, last, so a build that fails never replaces what was deployed before. Every step
reuses the cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
from pathlib import Path
from typing import Any

from slmops import progress
from slmops import registry as reg
from slmops.build import candidates
from slmops.build import convert as conv
from slmops.config import Config, home
from slmops.errors import NoImplementation, SlmopsError, UsageError
from slmops.host import isolate
from slmops.host.fsutil import changed_files, file_hashes, read_json, write_json_atomic
from slmops.measure import gate, quality
from slmops.results import Build, Deployment, Quality, Validation
from slmops.run.chat_session import ChatRunner


def plan(cfg: Config) -> list[str]:
    m, c, r, v = cfg.section("model"), cfg.section("convert"), cfg.section("registry"), cfg.section("validate")
    precision = (
        ("auto: " + " -> ".join(label for label, _ in candidates.CANDIDATES))
        if c["precision"] == "auto"
        else c["precision"]
    )
    return [
        f"1. source: {m['source']}" + (f" + adapter {m['adapter']} ({m['adapter_mode']})" if m["adapter"] else ""),
        f"2. convert with {c['backend']} backend"
        + (f" and {c['quantizer']} quantizer" if c["quantizer"] != "auto" else "")
        + f", precision {precision}; fp32 build as the quality reference",
        f"3. template: {m['family']} (checked against the tokenizer's chat template)",
        f"4. validate the packaged model: mean KLD <= {v['max_kld']}, top-1 >= {v['min_top1']}, "
        + (f"domain set {v['domain']} against the source, " if v["domain"] else "")
        + f"soak {v['soak_requests']} requests, edge cases",
        f"5. register as {m['name']} in {r['backend']} ({r['cache_dir'] or 'default location'}); an earlier {m['name']} stays unless this passes",
        "6. ask one question through the registry's runtime, print the benchmark summary",
    ]


def deploy(cfg: Config, ask: str | None = None) -> Deployment:
    name = reg.check_name(cfg.get("model.name"))
    registry = reg.open_registry(cfg)
    if cfg.get("validate.domain"):
        quality.load_set(Path(cfg.get("validate.domain")))  # a bad domain set is refused before any build
    # 1. convert: the fp32 reference, then the build (auto: the smallest candidate that passes the gate)
    build, q, tried = choose_build(cfg, cfg.convert_options())
    isolate.release()  # the builds' torch steps are done: their fork server's memory goes back before measuring
    key = deploy_key(build, cfg, name, registry)
    record_path = home() / "deploys" / f"{name}.json"
    record = read_json(record_path)
    if _still_deployed(registry, name, record, key):
        progress.note(
            f"{name} is already deployed from this build and passed validation: skipping register and validate"
        )
        validation, skipped = Validation.from_json(record["validation"]), True
    else:
        # 2. package: template chosen and checked, inference_model.json, a staged copy of the build
        with reg.package(build.path, name, cfg, registry.name) as pkg:
            # 3. validate the staged folder, the very files that will be registered
            validation = gate.validate(pkg.path, cfg, measured_quality=q)
            if not validation.ok:
                failed = "; ".join(f"{c.check} ({c.value}, limit {c.limit})" for c in validation.failed)
                raise SlmopsError(
                    f"{name}: the new build failed validation and was not registered "
                    f"(what was registered before under this name is unchanged): {failed}"
                )
            files = file_hashes(pkg.path)
            # 4. register, last
            reg.add(registry, pkg, replace=True)
        write_json_atomic(
            record_path, {"key": key, "build": str(build.path), "validation": validation.to_json(), "files": files}
        )
        skipped = False
    # How to use it next; a registry outside its default place is named, since those commands have no --registry-dir
    where = (
        "" if registry.root == registry.default_location() else f"{reg.REGISTRY_ENV}={shlex.quote(str(registry.root))} "
    )
    result = Deployment(
        name=name,
        build=build,
        registry=registry.name,
        tried=tried,
        validation=validation,
        run=f"{where}slmops model run {name}",
        serve=f"{where}slmops serve {name}",
        skipped=skipped,
    )
    if ask:
        runner = ChatRunner(registry, name, "registry", {"temperature": 0.0, "max_new_tokens": 64})
        with progress.step(f"Asking {name} through {registry.name if runner.engine == 'registry' else 'ORT GenAI'}"):
            result.answer = runner.answer(ask, None, None)
    return result


def choose_build(cfg: Config, base_options: dict[str, Any]) -> tuple[Build, Quality, list[dict[str, Any]]]:
    """(chosen build, its quality against the fp32 reference, table of what was tried). Auto: the smallest
    candidate that passes the gate, the domain set's checks included where one is given."""
    source, backend, quantizer = cfg.get("model.source"), cfg.get("convert.backend"), cfg.get("convert.quantizer")
    v = cfg.section("validate")
    domain = Path(v["domain"]) if v["domain"] else None
    reference = conv.reference(source, base_options, backend)
    if cfg.get("convert.precision") != "auto":
        build = conv.convert(source, base_options, backend, cfg.get("convert.output") or None, quantizer)
        with progress.step("Measuring quality against the fp32 reference"):
            q = measured_quality(build, reference)
        row = {"build": base_options["precision"], "size_mb": build.output_bytes / 1e6, **q.to_json(), "chosen": "yes"}
        return build, q, [row]
    tried, source_scores = [], None
    for label, extra in candidates.CANDIDATES:
        try:
            build = (
                reference
                if extra["precision"] == "fp32"
                else conv.convert(
                    source, candidates.candidate_options(base_options, extra), backend, quantizer_name=quantizer
                )
            )
        except NoImplementation:  # e.g. rtn_last with a LoRA kept as an adapter file: no plugin builds it
            tried.append({"build": label, "chosen": "cannot be built with these options"})
            continue
        except UsageError:
            raise
        except Exception as e:  # a route that fails on this model (a quantizer's calibration, say): the next one
            why = str(e) if isinstance(e, SlmopsError) else f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            progress.note(f"{label} failed on this model, trying the next candidate: {why}")
            tried.append({"build": label, "chosen": f"failed: {why}"})
            continue
        with progress.step(f"Measuring {label} against fp32"):
            q = measured_quality(build, reference)
        ok = q.passes(v["max_kld"], v["min_top1"])
        failed_domain = []
        if ok and domain:  # the domain set is part of the gate: a build that loses the task is not a good one
            scores = gate.domain_scores(build.path, reference.path, domain, source_scores)
            q, source_scores = dataclasses.replace(q, domain=scores), scores["source"]  # the source scored once
            failed_domain = [c.check for c in gate.domain_checks(q.domain, v["max_structure_drop"]) if not c.ok]
        row = {"build": label, "size_mb": build.output_bytes / 1e6, **quality_row(q)}
        chosen = f"no ({', '.join(failed_domain)})" if failed_domain else "yes" if ok else "no"
        tried.append({**row, "chosen": chosen})
        if chosen == "yes":
            return build, q, tried
    raise SlmopsError("no candidate passed the quality gate, not even fp32; loosen [validate] max_kld/min_top1")


def quality_row(q: Quality) -> dict[str, Any]:
    """A candidate's row in deploy's table: its quality and, where the domain set was scored, its accuracy."""
    row = q.to_json()
    if row.pop("domain", None):
        row["domain_accuracy"] = q.domain["accuracy"]
    return row


def measured_quality(build: Build, reference: Build) -> Quality:
    """quality.compare of two builds, remembered by their keys: the same two builds always give the same numbers."""
    memo = home() / "quality" / f"{build.key[:16]}-{reference.key[:16]}-{quality.corpus_id()}.json"
    if memo.is_file():
        return Quality.from_json(json.loads(memo.read_text()))
    result = quality.compare(build.path, reference.path)
    write_json_atomic(memo, result.to_json())
    return result


def deploy_key(build: Build, cfg: Config, name: str, registry: Any) -> str:
    """What a deployment depends on: the build, the gate (its domain set by content), the template family, the name,
    version and registry."""
    domain = cfg.get("validate.domain")
    parts = [build.key, cfg.section("validate"), cfg.get("model.family"), name, cfg.get("registry.version")]
    parts.append(hashlib.sha256(Path(domain).read_bytes()).hexdigest() if domain else None)
    return hashlib.sha256(json.dumps([*parts, str(registry.root)], sort_keys=True).encode()).hexdigest()


def _still_deployed(registry: Any, name: str, record: dict[str, Any], key: str) -> bool:
    """The registered model is the very one this deploy validated: same key, and its files unchanged (someone
    may have registered another build under the name since)."""
    if record.get("key") != key or "files" not in record:
        return False
    try:
        Validation.from_json(record["validation"])
    except (KeyError, TypeError, ValueError):  # a record written by an older slmops: validate again
        return False
    entry = next((e for e in registry.list() if e.name == name), None)
    return bool(entry and entry.status == "ok" and not changed_files(Path(entry.path), record["files"]))
