"""`slmops batch`: a manifest's jobs run through deploy's pipeline side by side, a failing job stops no other, a
finished manifest run again does no work, and the report is ranked, as a table, JSON and Markdown."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from slmops import batch

from .test_convert import lora_adapter  # noqa: F401 (the fixture: a LoRA for tiny_llama)

FAST = """
[defaults]
bench = { runs = 1, warmup = 0, max_new_tokens = 4, lengths = [16] }
validate = { soak_requests = 2, max_kld = 100.0, min_top1 = 0.0 }
"""


@pytest.fixture(scope="module")
def manifest(tiny_llama, lora_adapter, tmp_path_factory) -> Path:  # noqa: F811
    """Two tiny models (one through a LoRA), two precisions, and a source that cannot be converted."""
    tmp = tmp_path_factory.mktemp("batch")
    broken = tmp / "broken"
    shutil.copytree(tiny_llama, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    path = tmp / "batch.toml"
    path.write_text(
        FAST
        + f'[[models]]\nsource = "{tiny_llama}"\nname = "tiny"\nprecisions = ["int8", "fp32"]\n'
        + f'[[models]]\nsource = "{tiny_llama}"\nname = "tuned"\nprecisions = ["int8"]\n'
        + f'adapters = {{ support = "{lora_adapter}" }}\n'
        + '[[models]]\nsource = "broken"\nprecisions = ["int8"]\n'
    )
    return path


@pytest.fixture(scope="module")
def local_report(cli, manifest) -> dict:
    r = cli("batch", manifest, "--json", "--markdown", manifest.with_name("report.md"), timeout=1200)
    assert r.rc == 1 and r.out, r  # one job failed
    return {batch.job_name(j): j for j in r.json()["jobs"]}


def test_a_manifest_runs_ranks_and_is_not_run_twice(cli, manifest, local_report):
    jobs, ranked = local_report, list(local_report)
    assert {name: j["status"] for name, j in jobs.items()} == {
        "tiny-int8": "passed",
        "tuned-support-int8": "passed",
        "tiny-fp32": "passed",
        "broken-int8": "failed",
    }, jobs
    assert ranked[2:] == ["tiny-fp32", "broken-int8"]  # passed first, the smaller first
    tiny, tuned, fp32 = jobs["tiny-int8"], jobs["tuned-support-int8"], jobs["tiny-fp32"]
    assert tiny["size_mb"] < fp32["size_mb"] and tiny["adapter"] is None and tuned["adapter"] == "support"
    assert tiny["mean_kld"] > 0 and fp32["mean_kld"] == 0 and tiny["decode_tok_s"] > 0
    assert tuned["build"] != tiny["build"]  # the adapter merged: another build
    assert "NoSuchForCausalLM" in jobs["broken-int8"]["why"]
    assert "| 4 | broken-int8 | failed |" in manifest.with_name("report.md").read_text()

    start = time.perf_counter()
    again = cli("batch", manifest, "--json", timeout=600)
    rerun = {batch.job_name(j): j for j in again.json()["jobs"]}
    assert [j["status"] for j in rerun.values()] == ["cached", "cached", "cached", "failed"], rerun
    assert all(rerun[name]["build"] == jobs[name]["build"] for name in ranked[:3])
    assert "running 1 jobs" in again.err and time.perf_counter() - start < 120  # only the failed job is tried again


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster() -> str:
    """A real local Ray cluster: a head node on loopback with 2 CPUs (two jobs at once, each in its own worker)."""
    pytest.importorskip("ray")
    ray = Path(sys.executable).parent / "ray"
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = [ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", port, "--num-cpus", "2"]
    start += ["--include-dashboard", "false", "--temp-dir", temp, "--disable-usage-stats"]
    done = subprocess.run([str(a) for a in start], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    yield f"127.0.0.1:{port}"
    subprocess.run([str(ray), "stop", "--force"], env=env, capture_output=True, timeout=120)
    shutil.rmtree(temp, ignore_errors=True)


def test_the_same_manifest_on_a_ray_cluster_gives_the_same_report(cli, manifest, local_report, ray_cluster, tmp_path):
    """On Ray (with every job's worker killed once, mid-job: Ray runs it again) the report is the local one."""
    home = tmp_path / "home"  # nothing remembered: every job runs on the cluster
    env = {"SLMOPS_HOME": str(home), "SLMOPS_FAULT_AT": "batch:ray-task"}
    r = cli("batch", manifest, "--executor", "ray", "--ray-address", ray_cluster, "--json", env=env, timeout=1800)
    assert r.rc == 1 and r.out, r
    on_ray = {batch.job_name(j): j for j in r.json()["jobs"]}
    same = ("name", "adapter", "precision", "status", "size_mb", "mean_kld", "top1")
    assert [[j.get(k) for k in same] for j in on_ray.values()] == [
        [j.get(k) for k in same] for j in local_report.values()
    ]
    assert all(str(home) in j["build"] for j in on_ray.values() if j["status"] == "passed")
    killed = sorted(p.name for p in (home / "batch" / "faults").iterdir())
    assert killed == sorted(on_ray), killed  # each job's first worker died; its second attempt made the row


def test_an_unreachable_ray_cluster_is_one_line(cli_here, manifest):
    r = cli_here("batch", manifest, "--executor", "ray", "--ray-address", f"127.0.0.1:{free_port()}")
    lines = [line for line in r.err.splitlines() if line.startswith("slmops: error")]
    assert r.rc == 1 and len(lines) == 1 and "no Ray cluster answers at" in lines[0] and "Traceback" not in r.err, r


def test_a_bad_manifest_is_refused_in_one_line(cli_here, tmp_path):
    manifest = tmp_path / "batch.toml"
    for text, says in [
        ('[[models]]\nname = "x"\n', "has no source"),
        ('[[models]]\nsource = "default"\nprecision = ["int4"]\n', "unknown key 'precision'"),
        ('[[models]]\nsource = "default"\nprecisions = ["int3"]\n', "precisions must be"),
        ('[[models]]\nsource = "nowhere"\n', "source"),
        ('[defaults]\nvalidate = { max_kld = -1.0 }\n[[models]]\nsource = "default"\n', "is impossible"),
        ('[[models]]\nsource = "default"\n[[models]]\nsource = "default"\n', "two jobs are both named default-auto"),
    ]:
        manifest.write_text(text)
        r = cli_here("batch", manifest)
        lines = [line for line in r.err.splitlines() if line.startswith("slmops: error")]
        assert r.rc == 2 and len(lines) == 1 and says in lines[0] and "Traceback" not in r.err, (text, r)


def test_jobs_share_the_cpus_they_may_use(monkeypatch):
    from slmops import cpus

    monkeypatch.setattr(cpus, "allowed_cpus", lambda: 8)
    monkeypatch.setattr(cpus, "available_memory", lambda: 100 << 30)
    assert batch.workers_for(10, None) == (4, 2)
    assert batch.workers_for(10, 8) == (8, 1)
    monkeypatch.setattr(cpus, "available_memory", lambda: 7 << 30)  # two jobs' worth of memory
    assert batch.workers_for(10, None) == (2, 4)
