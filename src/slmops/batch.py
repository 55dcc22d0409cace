"""`slmops batch MANIFEST`: models x adapters x precisions through the deploy pipeline (convert, validate against the
source, and register where asked), jobs side by side on a local pool, one ranked report.

The manifest (TOML):

    [defaults]              # any slmops.toml section, for every job
    validate = { max_kld = 0.05 }

    [[models]]
    source = "checkpoints/base"        # required; relative paths are the manifest's folder's
    name = "orders"                    # default: the source folder's name
    precisions = ["int4", "int8"]      # default ["auto"]
    adapters = { sales = "adapters/sales", legal = "adapters/legal" }  # each a job of its own (merged)
    domain = "orders-eval.jsonl"       # a domain set the gate scores, beside the source
    register = false                   # register each job that passes, as NAME[-ADAPTER]-PRECISION

Each job runs in a process of its own (a crash or a failure stops that job only) and is remembered by what it
depends on (the source's content, the settings, the adapter, domain and calibration files, the tools' versions): a
manifest run again does no work for the jobs already done, and a registered job is checked by deploy itself."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape

from slmops import progress
from slmops.config import Config, _line_of, defaults, read_toml, with_tables
from slmops.errors import SlmopsError, UsageError
from slmops.host.fsutil import content_hash, read_json, write_json_atomic

MODEL_KEYS = {"source", "name", "precisions", "adapters", "domain", "register"}
PRECISIONS = ("auto", "fp32", "fp16", "int8", "int4")
JOB_MEMORY = 3 << 30  # what one job may take at most: above gptq's peak on a 135M model (docs/architecture.md)
STATUSES = ("passed", "cached", "failed")


@dataclass
class Job:
    """One build to make and check: a model's source, one of its adapters (or none) and one precision."""

    name: str
    source: str
    precision: str
    adapter: str | None = None  # the adapter's name in the manifest
    adapter_dir: str | None = None
    domain: str | None = None
    register: bool = False

    @property
    def label(self) -> str:
        return "-".join([self.name, *([self.adapter] if self.adapter else []), self.precision])


@dataclass
class Manifest:
    path: Path
    text: str  # the file as read: line numbers for errors in [defaults]
    defaults: dict[str, Any]  # the [defaults] tables, as slmops.toml's
    jobs: list[Job] = field(default_factory=list)

    def config(self, job: Job) -> Config:
        """The settings one job runs with: slmops's defaults, the manifest's, then the job's own."""
        cfg = with_tables(defaults(), self.defaults, self.path, self.text)
        for dotted, value in (
            ("model.source", job.source),
            ("model.name", job.label),
            ("model.adapter", job.adapter_dir or ""),
            ("convert.precision", job.precision),
            ("validate.domain", job.domain),
        ):
            cfg.override(dotted, value, f"{self.path} (job {job.label})")
        return cfg


def read_manifest(path: Path) -> Manifest:
    """The manifest's jobs, every setting checked before any work starts."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"manifest {path} not found; give a TOML file with [defaults] and [[models]] tables")
    text, data = read_toml(path, "manifest")
    unknown = set(data) - {"defaults", "models"}
    if unknown:
        raise UsageError(f"{path}: unknown table {sorted(unknown)[0]!r}; a manifest has [defaults] and [[models]]")
    manifest = Manifest(path, text, data.get("defaults") or {})
    if not isinstance(manifest.defaults, dict):
        raise UsageError(f"{path}: [defaults] must be a table of slmops.toml sections")
    with_tables(defaults(), manifest.defaults, path, text)  # a bad default is refused now, with its line
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise UsageError(f"{path}: no [[models]] table; give at least one, with a source")
    here = path.parent
    for number, model in enumerate(models, 1):
        where = f"{path}: [[models]] number {number}"
        if not isinstance(model, dict):
            raise UsageError(f"{where} must be a table")
        bad = set(model) - MODEL_KEYS
        if bad:
            key = sorted(bad)[0]
            raise UsageError(
                f"{path}:{_line_of(text, key)}: unknown key {key!r}; known: {', '.join(sorted(MODEL_KEYS))}"
            )
        source = model.get("source")
        if not isinstance(source, str) or not source:
            raise UsageError(f"{where} has no source; give a checkpoint folder, a GGUF file or 'default'")
        source = source if source == "default" else str(_local(here, source, where, "source"))
        name = model.get("name") or ("default" if source == "default" else Path(source).stem)
        precisions = model.get("precisions", ["auto"])
        if not isinstance(precisions, list) or not precisions or any(p not in PRECISIONS for p in precisions):
            raise UsageError(f"{where}: precisions must be a non-empty list of {', '.join(PRECISIONS)}")
        adapters = model.get("adapters") or {}
        if not isinstance(adapters, dict) or any(not isinstance(v, str) for v in adapters.values()):
            raise UsageError(f'{where}: adapters must be a table of name = "folder"')
        domain = model.get("domain")
        if domain is not None:
            from slmops.measure import quality

            domain = str(_local(here, domain, where, "domain"))
            quality.load_set(Path(domain))  # a bad domain set is refused before any build
        register = model.get("register", False)
        if not isinstance(register, bool):
            raise UsageError(f"{where}: register must be true or false")
        for adapter in list(adapters) or [None]:
            adapter_dir = str(_local(here, adapters[adapter], where, f"adapter {adapter}")) if adapter else None
            for precision in precisions:
                manifest.jobs.append(Job(str(name), source, precision, adapter, adapter_dir, domain, register))
    labels = [j.label for j in manifest.jobs]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise UsageError(f"{path}: two jobs are both named {twice[0]}; give the models different names")
    return manifest


def _local(here: Path, value: Any, where: str, what: str) -> Path:
    if not isinstance(value, str) or not value:
        raise UsageError(f"{where}: {what} must be a path")
    path = (here / value).expanduser() if not Path(value).is_absolute() else Path(value)
    if not path.exists():
        raise UsageError(f"{where}: {what} {path} does not exist")
    return path


def job_key(manifest: Manifest, job: Job) -> str:
    """What a job's result depends on: its settings, the content of every file it reads, the tools' versions."""
    from slmops.build import sources
    from slmops.build.convert import tool_versions

    cfg = manifest.config(job)
    files = [job.adapter_dir, job.domain, cfg.get("convert.calibration") or None]
    parts = {
        "source": sources.resolve(job.source).sha256,
        "settings": cfg.values,
        **({"plugins": cfg.plugins} if cfg.plugins else {}),  # a plugin's own options ([plugins.NAME])
        "files": [content_hash(Path(f)) if f else None for f in files],
        "tools": tool_versions(),
    }
    parts["settings"]["model"]["adapter"] = bool(job.adapter_dir)  # the file's content counts, not where it is
    parts["settings"]["validate"]["domain"] = bool(job.domain)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def run_job(manifest: Manifest, job: Job) -> dict[str, Any]:
    """One job, in this process: deploy's choice of build, its validation, and (register) the registration."""
    from slmops import deploy
    from slmops.measure import gate

    cfg = manifest.config(job)
    if job.register:
        result = deploy.deploy(cfg)
        build, validation, cached = result.build, result.validation, result.skipped
    else:
        build, measured, _ = deploy.choose_build(cfg, cfg.convert_options())
        validation = gate.validate(build.path, cfg, measured_quality=measured)
        cached = False
    q, bench = validation.quality, validation.bench
    return {
        "status": "cached" if cached else "passed" if validation.ok else "failed",
        "why": "; ".join(f"{c.check} ({c.value}, limit {c.limit})" for c in validation.failed) or None,
        "build": str(build.path),
        "built_precision": build.precision,
        "size_mb": round(build.output_bytes / 1e6, 1),
        "mean_kld": q.mean_kld,
        "top1": q.top1_agreement,
        "domain_accuracy": (q.domain or {}).get("accuracy"),
        "decode_tok_s": bench.decode_tok_s,
        "registered": job.label if job.register and validation.ok else None,
    }


def workers_for(jobs: int, asked: int | None) -> tuple[int, int]:
    """(jobs at once, ONNX Runtime threads each) within the CPUs and memory this process may use."""
    from slmops.host.cpus import allowed_cpus, available_memory

    cpus = allowed_cpus()
    if asked is not None and not 1 <= asked <= cpus:
        raise UsageError(f"--jobs {asked} is not 1 to {cpus} (the CPUs this process may use)")
    by_memory = max(1, available_memory() // JOB_MEMORY)
    at_once = max(1, min(jobs, asked or max(1, cpus // 2), by_memory))
    return at_once, max(1, cpus // at_once)


def run(
    manifest: Manifest, jobs_at_once: int | None = None, executor: str = "local", address: str | None = None
) -> list[dict[str, Any]]:
    """Every job of the manifest: the remembered result where there is one, else run in a child process, here
    (executor "local") or on a Ray cluster's nodes ("ray", at address); the rows ranked (passed first, then the
    smallest build, then the lowest mean KLD)."""
    from slmops.config import home

    memo = home() / "batch"
    memo.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    todo = []
    for job in manifest.jobs:
        base = {"name": job.name, "adapter": job.adapter, "precision": job.precision}
        try:
            key = job_key(manifest, job) if not job.register else None
        except SlmopsError as e:  # a source that is not one: this job fails, the others go on
            rows.append({**base, "status": "failed", "why": str(e), "seconds": 0.0})
            continue
        known = read_json(memo / f"{key}.json") if key else {}
        if known and known.get("status") == "passed" and Path(known.get("build", "")).is_dir():
            rows.append({**base, **known, "status": "cached", "seconds": 0.0})
        else:
            todo.append((job, base, key))
    total, done = len(manifest.jobs), len(rows)
    if rows:
        progress.note(f"{done} of {total} jobs already done (their results are remembered)")
    if not todo:
        return sorted(rows, key=rank)
    if executor == "ray":
        results, at_once = ray_results(manifest, [job for job, _, _ in todo], address), len(todo)
    else:
        at_once, threads = workers_for(len(todo), jobs_at_once)
        progress.note(f"running {len(todo)} jobs, {at_once} at a time, {threads} thread(s) each")
        results = local_results(manifest, [job for job, _, _ in todo], at_once, threads)
    by_label = {job.label: (base, key) for job, base, key in todo}
    for label, result, seconds in results:
        base, key = by_label[label]
        if key and result.get("status") == "passed":
            write_json_atomic(memo / f"{key}.json", result)
        row = {**base, **result, "seconds": round(seconds, 1)}
        rows.append(row)
        done += 1
        running = min(at_once, total - done)
        progress.note(
            escape(
                f"{done}/{total} done, {running} running, {total - done - running} left: {label} "
                f"{row['status']} in {row['seconds']:.0f} s" + (f" ({row['why']})" if row.get("why") else "")
            )
        )
    return sorted(rows, key=rank)


Results = Iterator[tuple[str, dict[str, Any], float]]  # (job label, its result, seconds), as the jobs end


def local_results(manifest: Manifest, jobs: list[Job], at_once: int, threads: int) -> Results:
    """The jobs on this machine, at_once at a time, each in its own process."""

    def one(job: Job) -> tuple[str, dict[str, Any], float]:
        start = time.perf_counter()
        return job.label, _in_child(manifest, job, threads), time.perf_counter() - start

    with ThreadPoolExecutor(at_once) as pool:
        for future in as_completed([pool.submit(one, job) for job in jobs]):
            yield future.result()


RAY_RETRIES = 3  # a job whose worker dies (killed, a node lost) runs again, up to this many times
CARRIED_ENV = ("HF_HUB_OFFLINE", "TQDM_DISABLE")  # with every SLMOPS_* variable: what a job on a node must see


def ray_results(manifest: Manifest, jobs: list[Job], address: str | None) -> Results:
    """The jobs as tasks of the Ray cluster at address (else $RAY_ADDRESS), each in its own process on a node.
    Nodes must see the manifest's files and slmops's home at the same paths (one machine, or a shared mount); the
    results come back through Ray's object store and the driver writes the report."""
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray needs Ray: pip install 'slmops[ray]'") from None
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UsageError("--executor ray needs a cluster: give --ray-address HOST:PORT or set RAY_ADDRESS")
    _check_reachable(address)
    # Ray's own messages (a worker that died, say) go to stderr with slmops's progress: stdout is the report's
    quiet_stdout = contextlib.redirect_stdout(sys.stderr)
    quiet_stdout.__enter__()
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    except Exception as e:  # noqa: BLE001 - Ray's own reasons are many; the user gets one line
        quiet_stdout.__exit__(None, None, None)
        raise SlmopsError(f"cannot join the Ray cluster at {address}: {' '.join(str(e).split())[:200]}") from None
    try:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        largest = max((int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n.get("Alive")), default=1)
        threads = max(1, min(largest, cpus // min(len(jobs), cpus)))  # every CPU busy, no task bigger than a node
        progress.note(f"running {len(jobs)} jobs on the Ray cluster at {address} ({cpus} CPUs, {threads} each)")
        env = {k: v for k, v in os.environ.items() if k.startswith("SLMOPS_") or k in CARRIED_ENV}
        task = ray.remote(num_cpus=threads, max_retries=RAY_RETRIES, retry_exceptions=False)(_ray_job)
        pending = {task.remote(str(manifest.path), asdict(job), threads, env): job for job in jobs}
        started = time.perf_counter()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 - the task's retries ran out: this job failed, the others go on
                result = {"status": "failed", "why": f"on Ray: {type(e).__name__}: {' '.join(str(e).split())[:200]}"}
            yield job.label, result, time.perf_counter() - started
    finally:
        ray.shutdown()
        quiet_stdout.__exit__(None, None, None)


def _check_reachable(address: str) -> None:
    """A cluster address that answers no connection is refused at once (Ray itself retries for a minute)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError):
        raise SlmopsError(
            f"no Ray cluster answers at {address}; start one (`ray start --head`) or give its address with "
            "--ray-address HOST:PORT"
        ) from None


def _ray_job(manifest_path: str, job: dict[str, Any], threads: int, env: dict[str, str]) -> dict[str, Any]:
    """On a Ray worker: one job, in a process of its own, with the driver's slmops settings."""
    os.environ.update(env)
    from slmops.config import home
    from slmops.host.cpus import allowed_cpus
    from slmops.host.fsutil import fault_point

    spec = Job(**job)
    fault_point("batch:ray-task", once=home() / "batch" / "faults" / spec.label)  # tests: a worker killed once
    return _in_child(read_manifest(Path(manifest_path)), spec, min(threads, allowed_cpus()))


def rank(row: dict[str, Any]) -> tuple:
    return (row["status"] == "failed", row.get("size_mb") or float("inf"), row.get("mean_kld") or float("inf"))


def _in_child(manifest: Manifest, job: Job, threads: int) -> dict[str, Any]:
    """run_job in a process of its own: whatever it does (an error, a crash), the other jobs go on."""
    with tempfile.TemporaryDirectory(prefix="slmops-batch-") as tmp:
        spec, out = Path(tmp) / "job.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({"manifest": str(manifest.path), "job": asdict(job), "out": str(out)}))
        env = {**os.environ, "SLMOPS_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
        with tempfile.TemporaryFile() as log:
            done = subprocess.run(
                [sys.executable, "-m", "slmops.batch", str(spec)], stdout=log, stderr=subprocess.STDOUT, env=env
            )
            if out.is_file():
                return json.loads(out.read_text())
            log.seek(0)
            tail = [line for line in log.read().decode(errors="replace").splitlines() if line.strip()][-1:]
            return {"status": "failed", "why": f"the job's process ended with {done.returncode}: {' '.join(tail)}"}


def markdown(rows: list[dict[str, Any]]) -> str:
    """The report as a Markdown table."""
    head = ["#", "job", "status", "MB", "mean KLD", "top-1", "domain", "decode tok/s", "why"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for number, r in enumerate(rows, 1):
        cells = [number, job_name(r), r["status"], r.get("size_mb"), r.get("mean_kld"), r.get("top1")]
        cells += [r.get("domain_accuracy"), r.get("decode_tok_s"), r.get("why") or ""]
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def job_name(row: dict[str, Any]) -> str:
    return "-".join([row["name"], *([row["adapter"]] if row.get("adapter") else []), row["precision"]])


def _md(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def main() -> None:
    """A child process's job: python -m slmops.batch JOB.json (written by _in_child)."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    manifest = read_manifest(Path(spec["manifest"]))
    job = Job(**spec["job"])
    progress.quiet = True
    try:
        result = run_job(manifest, job)
    except SlmopsError as e:
        result = {"status": "failed", "why": str(e)}
    except Exception as e:  # noqa: BLE001 - a job's failure, whatever it is, is that job's row
        result = {"status": "failed", "why": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
    write_json_atomic(Path(spec["out"]), result)


if __name__ == "__main__":
    main()
