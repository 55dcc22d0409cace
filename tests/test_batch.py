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

FAST = """
[defaults]
bench = { runs = 1, warmup = 0, max_new_tokens = 4, lengths = [16] }
validate = { soak_requests = 2, max_kld = 100.0, min_top1 = 0.0 }
"""


def make_lora(model: Path, out: Path, seed: int) -> Path:
    """A random LoRA (seeded) on q, v and down of a tiny model, as PEFT saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    targets = ["q_proj", "v_proj", "down_proj"]
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model),
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
    )
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def manifest(tiny_llama, tiny_qwen2, tmp_path_factory) -> Path:
    """Two tiny models (Llama, Qwen2) x two LoRAs each x two precisions, and a source that cannot be converted."""
    tmp = tmp_path_factory.mktemp("batch")
    broken = tmp / "broken"
    shutil.copytree(tiny_llama, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    text = FAST
    for seed, (name, model) in enumerate([("llama", tiny_llama), ("qwen", tiny_qwen2)]):
        support = make_lora(model, tmp / f"{name}-support", seed=2 * seed)
        legal = make_lora(model, tmp / f"{name}-legal", seed=2 * seed + 1)
        text += f'[[models]]\nsource = "{model}"\nname = "{name}"\nprecisions = ["int8", "fp32"]\n'
        text += f'adapters = {{ support = "{support}", legal = "{legal}" }}\n'
    path = tmp / "batch.toml"
    path.write_text(text + '[[models]]\nsource = "broken"\nprecisions = ["int8"]\n')
    return path


@pytest.fixture(scope="module")
def local_report(cli, manifest) -> dict:
    r = cli("batch", manifest, "--json", "--markdown", manifest.with_name("report.md"), timeout=1800)
    assert r.rc == 1 and r.out, r  # one job failed
    return {batch.job_name(j): j for j in r.json()["jobs"]}


JOBS = [f"{m}-{a}-{p}" for m in ("llama", "qwen") for a in ("support", "legal") for p in ("int8", "fp32")]


def test_a_manifest_runs_ranks_and_is_not_run_twice(cli, manifest, local_report):
    jobs, ranked = local_report, list(local_report)
    assert {name: j["status"] for name, j in jobs.items()} == {
        **{name: "passed" for name in JOBS},
        "broken-int8": "failed",
    }, jobs
    assert [jobs[n]["precision"] for n in ranked] == ["int8"] * 4 + ["fp32"] * 4 + ["int8"]  # passed, smaller first
    assert ranked[-1] == "broken-int8" and "NoSuchForCausalLM" in jobs["broken-int8"]["why"]
    for model in ("llama", "qwen"):
        for adapter in ("support", "legal"):
            int8, fp32 = jobs[f"{model}-{adapter}-int8"], jobs[f"{model}-{adapter}-fp32"]
            assert int8["adapter"] == adapter and int8["size_mb"] < fp32["size_mb"], (int8, fp32)
            assert int8["mean_kld"] > fp32["mean_kld"] >= 0 and int8["decode_tok_s"] > 0
        # each adapter merged into its own build, measured against its own merged source
        assert jobs[f"{model}-support-int8"]["build"] != jobs[f"{model}-legal-int8"]["build"]
        assert jobs[f"{model}-support-int8"]["mean_kld"] != jobs[f"{model}-legal-int8"]["mean_kld"]
    assert "| 9 | broken-int8 | failed |" in manifest.with_name("report.md").read_text()

    start = time.perf_counter()
    again = cli("batch", manifest, "--json", timeout=600)
    rerun = {batch.job_name(j): j for j in again.json()["jobs"]}
    assert [j["status"] for j in rerun.values()] == ["cached"] * 8 + ["failed"], rerun
    assert all(rerun[name]["build"] == jobs[name]["build"] for name in JOBS)
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


def test_jobs_on_a_ray_cluster_give_the_local_report(cli, manifest, local_report, ray_cluster, tiny_llama, tmp_path):
    """On Ray (with every job's worker killed once, mid-job: Ray runs it again) the report is the local one. A part
    of the manifest (one adapter of one model at both precisions, and the broken source): each job reruns its whole
    build on the cluster, and the nine took six minutes of the suite."""
    part = tmp_path / "batch.toml"
    part.write_text(
        FAST + f'[[models]]\nsource = "{tiny_llama}"\nname = "llama"\nprecisions = ["int8", "fp32"]\n'
        f'adapters = {{ support = "{manifest.with_name("llama-support")}" }}\n'
        f'[[models]]\nsource = "{manifest.with_name("broken")}"\nprecisions = ["int8"]\n'
    )
    home = tmp_path / "home"  # nothing remembered: every job runs on the cluster
    env = {"SLMOPS_HOME": str(home), "SLMOPS_FAULT_AT": "batch:ray-task"}
    r = cli("batch", part, "--executor", "ray", "--ray-address", ray_cluster, "--json", env=env, timeout=1800)
    assert r.rc == 1 and r.out, r
    on_ray = {batch.job_name(j): j for j in r.json()["jobs"]}
    assert list(on_ray) == ["llama-support-int8", "llama-support-fp32", "broken-int8"], on_ray
    same = ("name", "adapter", "precision", "status", "size_mb", "mean_kld", "top1")
    assert [[j.get(k) for k in same] for j in on_ray.values()] == [
        [local_report[name].get(k) for k in same] for name in on_ray
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
    from slmops.host import cpus

    monkeypatch.setattr(cpus, "allowed_cpus", lambda: 8)
    monkeypatch.setattr(cpus, "available_memory", lambda: 100 << 30)
    assert batch.workers_for(10, None) == (4, 2)
    assert batch.workers_for(10, 8) == (8, 1)
    monkeypatch.setattr(cpus, "available_memory", lambda: 7 << 30)  # two jobs' worth of memory
    assert batch.workers_for(10, None) == (2, 4)
