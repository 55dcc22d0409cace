"""Never lose a deployment: each way data was lost before has a test that reproduces it, and the state is checked
on disk (files, hashes, the Foundry Local record), not only through the commands' own words."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from slmops.host.fsutil import clean_stale

# Small bench settings: validation in these tests checks the gate logic, not the speed.
FAST_TOML = "[bench]\nruns = 1\nwarmup = 0\nmax_new_tokens = 4\nlengths = [16]\n[validate]\nsoak_requests = 2\n"


def tree_hashes(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def record_ids(registry_dir: Path) -> list[str]:
    record = json.loads((registry_dir / "foundry.local.modelinfo.json").read_text())
    return sorted(m["model_info"]["id"] for m in record["models"])


@pytest.fixture()
def fast_config(tmp_path) -> Path:
    path = tmp_path / "fast.toml"
    path.write_text(FAST_TOML)
    return path


def test_failed_gate_keeps_the_earlier_deployment(cli, tiny_llama, tmp_path, fast_config):
    """Item 1: a deploy whose build fails the gate registers nothing and leaves the earlier model as it was."""
    reg = tmp_path / "reg"
    common = ["--config", fast_config, "deploy", "--source", tiny_llama, "--name", "keep", "--registry-dir", reg]
    assert cli(*common, "--precision", "fp32").rc == 0
    folder = reg / "custom" / "keep"
    before = tree_hashes(folder)
    r = cli(*common, "--precision", "int4", "--max-kld", "0")  # int4 always differs from fp32 a little
    assert r.rc == 1 and "failed validation and was not registered" in r.err and "unchanged" in r.err, r
    assert tree_hashes(folder) == before and record_ids(reg) == ["keep:1"]
    env = {"SLMOPS_REGISTRY_DIR": str(reg)}
    assert cli("model", "run", "keep", "--prompt", "Hi", "--max-new-tokens", "2", env=env).rc == 0
    # Deploying again after the failed gate, with a gate the int4 build passes, replaces the model.
    again = cli(*common, "--precision", "int4", "--max-kld", "100", "--min-top1", "0")
    assert again.rc == 0 and "already deployed" not in again.err, again
    assert tree_hashes(folder) != before and record_ids(reg) == ["keep:1"]
    manifest = json.loads((folder / "slmops-manifest.json").read_text())
    assert manifest["options"]["precision"] == "int4"


def test_refused_registration_keeps_the_existing_one(cli, registry_dir, tiny_llama_int4, tmp_path):
    """Item 2: a broken genai_config.json is refused (slmops's own template check loads it with ORT GenAI first);
    the model registered under that name stays."""
    assert cli("register", tiny_llama_int4.path, "--name", "x").rc == 0
    folder = registry_dir / "custom" / "x"
    before = tree_hashes(folder)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_int4.path, broken)
    (broken / "genai_config.json").write_text("{broken")
    r = cli("register", broken, "--name", "x")
    assert r.rc == 1 and "ONNX Runtime GenAI cannot load" in r.err and "genai_config.json" in r.err, r
    assert len(r.err.strip().splitlines()) == 2 and "Traceback" not in r.err and ".cc:" not in r.err, r
    assert tree_hashes(folder) == before and record_ids(registry_dir) == ["x:1"]
    assert not [p for p in (registry_dir / "custom").iterdir() if p.name.startswith(".")]
    assert cli("model", "run", "x", "--prompt", "Hi", "--max-new-tokens", "2").rc == 0


def test_every_place_has_its_own_files(cli, registry_dir, tiny_llama, tmp_path):
    """Item 3: no hard links between the cache, -o outputs and registrations; a changed cache entry is rebuilt."""
    import onnx

    out = tmp_path / "out"
    r = cli("convert", tiny_llama, "--precision", "int8", "-o", out, "--json")
    assert r.rc == 0, r
    build = Path(r.json()["path"])
    cached = Path(cli("convert", tiny_llama, "--precision", "int8", "--json").json()["path"])
    assert cli("register", out, "--name", "own").rc == 0
    registered = registry_dir / "custom" / "own"
    for folder in (out, cached, registered):
        assert all(p.stat().st_nlink == 1 for p in folder.rglob("*") if p.is_file()), folder
        onnx.load(str(folder / "model.onnx"))  # refuses multiply-linked weights
    (registered / "genai_config.json").write_text((registered / "genai_config.json").read_text().replace("\n", "\n "))
    assert tree_hashes(cached) == tree_hashes(out)  # the edit stayed in its own place
    # Edit the cached build in place: the next convert notices, rebuilds and verifies.
    data = cached / "genai_config.json"
    data.write_text(data.read_text() + " ")
    again = cli("convert", tiny_llama, "--precision", "int8", "--json")
    assert again.rc == 0 and not again.json()["cached"], again
    assert "was changed since it was verified (genai_config.json): rebuilding" in " ".join(again.err.split())
    assert data.read_text() == (out / "genai_config.json").read_text() and build == out


def test_output_folder_keeps_the_users_files(cli, tiny_llama, tmp_path):
    """Item 4: `convert -o` never deletes what the user put there; a folder that is not a build is refused."""
    out = tmp_path / "out"
    assert cli("convert", tiny_llama, "--precision", "fp32", "-o", out).rc == 0
    (out / "NOTES.md").write_text("my notes")
    (out / "eval").mkdir()
    (out / "eval" / "scores.csv").write_text("a,b\n1,2\n")
    r = cli("convert", tiny_llama, "--precision", "int8", "-o", out, "--json")
    assert r.rc == 0, r
    assert (out / "NOTES.md").read_text() == "my notes" and (out / "eval" / "scores.csv").read_text() == "a,b\n1,2\n"
    assert json.loads((out / "slmops-manifest.json").read_text())["options"]["precision"] == "int8"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    r = cli("convert", tiny_llama, "--precision", "fp32", "-o", mine)
    assert r.rc == 1 and "is not an slmops model" in r.err
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


def test_registered_model_with_its_folder_deleted(cli, registry_dir, tiny_llama_int4, tmp_path):
    """Item 5: shown as missing (sizing nothing), clear errors from run/bench/cd, and `cache rm` cleans it."""
    assert cli("register", tiny_llama_int4.path, "--name", "gone").rc == 0
    shutil.rmtree(registry_dir / "custom" / "gone")
    r = cli("cache", "ls", "--json", cwd=Path("/"))
    assert r.rc == 0, r
    (row,) = r.json()
    assert (
        row["status"] == "missing" and row["size_bytes"] == 0 and row["path"] == str(registry_dir / "custom" / "gone")
    )
    for args in (
        ("model", "run", "gone", "--prompt", "hi"),
        ("bench", "gone"),
        ("validate", "gone"),
        ("cache", "cd", "gone"),
    ):
        r = cli(*args)
        assert r.rc == 1 and "is missing" in r.err and "slmops cache rm gone" in r.err and "Traceback" not in r.err, (
            args,
            r,
        )
    assert cli("cache", "rm", "gone", "--yes").rc == 0
    assert cli("cache", "ls", "--json").json() == [] and record_ids(registry_dir) == []


def test_deploy_revalidates_after_someone_else_registered(cli, tiny_llama, tiny_llama_int4, tmp_path, fast_config):
    """deploy skips its work only when the registered model is still the one it validated."""
    reg = tmp_path / "reg"
    args = [
        "--config",
        fast_config,
        "deploy",
        "--source",
        tiny_llama,
        "--name",
        "d",
        "--precision",
        "fp32",
        "--registry-dir",
        reg,
    ]
    assert cli(*args).rc == 0
    assert "already deployed" in cli(*args).err
    env = {"SLMOPS_REGISTRY_DIR": str(reg)}
    assert cli("register", tiny_llama_int4.path, "--name", "d", env=env).rc == 0
    r = cli(*args, "--json")
    assert r.rc == 0 and "already deployed" not in r.err, r
    manifest = json.loads((reg / "custom" / "d" / "slmops-manifest.json").read_text())
    assert manifest["options"]["precision"] == "fp32"


def test_stale_leftovers_are_cleaned_or_restored(tmp_path):
    """What a killed process leaves: half-written folders go, a folder moved aside for a swap comes back."""
    dead = 2**22 + 12345  # above Linux's default pid_max: never a live process
    (tmp_path / f".model.partial-{dead}-abc").mkdir()
    (tmp_path / f".work-{dead}-xyz").mkdir()
    (tmp_path / f".other.old-{dead}").mkdir()
    (tmp_path / f".other.old-{dead}" / "genai_config.json").write_text("{}")
    (tmp_path / f".kept.old-{dead}").mkdir()
    (tmp_path / "kept").mkdir()
    (tmp_path / f".live.partial-{os.getpid()}-abc").mkdir()
    clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".live.partial-{os.getpid()}-abc", "kept", "other"]
    assert (tmp_path / "other" / "genai_config.json").is_file()


def test_a_turn_longer_than_the_context_keeps_the_chat(cli, registry_dir, tiny_llama_int4):
    assert cli("register", tiny_llama_int4.path, "--name", "talk").rc == 0
    r = cli("model", "run", "talk", "--max-new-tokens", "2", input="word " * 600 + "\nHello\nexit\n")
    assert r.rc == 0, r
    assert "the conversation is" in r.err and "shorten the prompt" in r.err
    assert r.out.count(">>> ") == 3  # the long turn, then Hello was answered, then exit


def test_builds_ls_rm_prune(cli, tiny_llama, registry_dir, tmp_path, monkeypatch):
    home = tmp_path / "home"
    env = {"SLMOPS_HOME": str(home)}
    used = cli("convert", tiny_llama, "--precision", "fp32", "--json", env=env).json()
    unused = cli("convert", tiny_llama, "--precision", "int8", "--json", env=env).json()
    spare = cli("convert", tiny_llama, "--precision", "int4", "--json", env=env).json()
    assert cli("register", used["path"], "--name", "uses-fp32", env=env).rc == 0
    rows = {r["build"]: r for r in cli("builds", "ls", "--json", env=env).json()}
    assert rows[Path(used["path"]).name]["used_by"] == ["registered uses-fp32"]
    assert rows[Path(unused["path"]).name]["used_by"] == [] and rows[Path(unused["path"]).name]["size_bytes"] > 0
    assert cli("builds", "rm", Path(spare["path"]).name, env=env).rc == 0 and not Path(spare["path"]).exists()
    r = cli("builds", "rm", "nosuch", env=env)
    assert r.rc == 1 and "no build named 'nosuch'" in r.err
    dry = cli("builds", "prune", "--dry-run", "--json", env=env).json()
    assert [r["build"] for r in dry["removed"]] == [Path(unused["path"]).name] and Path(unused["path"]).exists()
    assert cli("builds", "prune", env=env).rc == 0
    assert not Path(unused["path"]).exists() and Path(used["path"]).is_dir()
    assert cli("model", "run", "uses-fp32", "--prompt", "Hi", "--max-new-tokens", "2", env=env).rc == 0
