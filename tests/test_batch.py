"""`slmops batch`: a manifest's jobs run through deploy's pipeline side by side, a failing job stops no other, a
finished manifest run again does no work, and the report is ranked, as a table, JSON and Markdown."""

from __future__ import annotations

import json
import shutil
import time

from slmops import batch

from .test_convert import lora_adapter  # noqa: F401 (the fixture: a LoRA for tiny_llama)

FAST = """
[defaults]
bench = { runs = 1, warmup = 0, max_new_tokens = 4, lengths = [16] }
validate = { soak_requests = 2, max_kld = 100.0, min_top1 = 0.0 }
"""


def test_a_manifest_runs_ranks_and_is_not_run_twice(cli, tiny_llama, lora_adapter, tmp_path):  # noqa: F811
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    manifest = tmp_path / "batch.toml"
    manifest.write_text(
        FAST
        + f'[[models]]\nsource = "{tiny_llama}"\nname = "tiny"\nprecisions = ["int8", "fp32"]\n'
        + f'[[models]]\nsource = "{tiny_llama}"\nname = "tuned"\nprecisions = ["int8"]\n'
        + f'adapters = {{ support = "{lora_adapter}" }}\n'
        + '[[models]]\nsource = "broken"\nprecisions = ["int8"]\n'
    )
    report = tmp_path / "report.md"
    r = cli("batch", manifest, "--json", "--markdown", report, timeout=1200)
    assert r.rc == 1 and r.out, r  # one job failed
    jobs = {batch.job_name(j): j for j in r.json()["jobs"]}
    ranked = list(jobs)
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
    assert "| 4 | broken-int8 | failed |" in report.read_text()

    start = time.perf_counter()
    again = cli("batch", manifest, "--json", timeout=600)
    rerun = {batch.job_name(j): j for j in again.json()["jobs"]}
    assert [j["status"] for j in rerun.values()] == ["cached", "cached", "cached", "failed"], rerun
    assert all(rerun[name]["build"] == jobs[name]["build"] for name in ranked[:3])
    assert "running 1 jobs" in again.err and time.perf_counter() - start < 120  # only the failed job is tried again


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
