"""slmops without its extras (torch, olive, foundry, serve, report): the core runs and measures a built model folder,
and a command that needs an extra says which in one line. The extras are hidden from the child process (as if not
installed: their imports fail and importlib finds no spec); make wheel-check installs the wheel without them too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from slmops import extras

from .conftest import NEUTRAL_DIR

HIDDEN = sorted({module for modules in extras.EXTRAS.values() for module in modules})
CORE_ONLY = [
    sys.executable,
    "-c",
    f"import sys; sys.modules.update(dict.fromkeys({HIDDEN!r})); from slmops.cli import main; main()",
]


def core_only(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [*CORE_ONLY, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=NEUTRAL_DIR,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def test_the_core_loads_every_plugin_and_measures_a_built_folder(tiny_llama_int4):
    listed = core_only("plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    plugins = json.loads(listed.stdout)
    assert not plugins["errors"], plugins["errors"]  # every built-in imports without its extras
    assert {"slmops.plugins.gguf_native", "slmops.plugins.foundry_local"} <= {p["name"] for p in plugins["plugins"]}

    folder = tiny_llama_int4.path
    args = ["bench", folder, "--no-edge-cases", "--reference", folder, "--runs", "1", "--max-new-tokens", "4"]
    done = core_only(*args, "--lengths", "16", "--soak", "0", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["decode_tok_s"] > 0 and result["quality"]["mean_kld"] < 1e-6, result


def test_a_command_that_needs_an_extra_says_which(tiny_llama, tiny_llama_int4, tmp_path):
    env = {"SLMOPS_HOME": str(tmp_path / "home"), "SLMOPS_REGISTRY_DIR": str(tmp_path / "registry")}
    for args, extra in [
        (["convert", tiny_llama, "--precision", "int8"], "torch"),  # nothing cached: the builder needs torch
        (["serve", "--port", "0"], "serve"),
        (["register", tiny_llama_int4.path, "--name", "tiny"], "foundry"),
    ]:
        done = core_only(*args, env=env)
        errors = [line for line in done.stderr.splitlines() if line.startswith("slmops: error")]
        assert done.returncode == 1 and len(errors) == 1, (args, done.stderr[-2000:])
        assert f"pip install 'slmops[{extra}]'" in errors[0] and "Traceback" not in done.stderr, errors
    assert not list(Path(env["SLMOPS_HOME"]).glob("builds/*")), "nothing half-built"


def test_doctor_names_the_extra_of_a_missing_distribution(monkeypatch):
    from slmops import doctor

    real = doctor._version
    monkeypatch.setattr(doctor, "_version", lambda dist: None if dist in ("torch", "olive-ai") else real(dist))
    rows = {r["check"]: r for r in doctor.checks()}
    assert rows["torch"]["status"] == "warn" and "slmops[torch]" in rows["torch"]["detail"], rows["torch"]
    assert rows["olive-ai"]["status"] == "warn" and "slmops[olive]" in rows["olive-ai"]["detail"]
    assert rows["onnxruntime"]["status"] == "ok"
