"""kill -9 `register`, `deploy` and `convert` at random moments, then check what must hold whatever the moment:
every registry record has a complete folder and every folder a record; only validated or hand-registered models
are registered; no temporary folder survives the next command; outputs nobody touched are byte-identical; no child
process outlives its killed parent. Also SIGTERM: it unwinds and takes the model builder with it."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from slmops.host.fsutil import STALE_RE
from tests.conftest import NEUTRAL_DIR, SLMOPS, run_cli

KILLS = 20  # kills that land; each costs up to a whole command's run, and the suite's time is bounded
FAST_TOML = "[bench]\nruns = 1\nwarmup = 0\nmax_new_tokens = 4\nlengths = [16]\n[validate]\nsoak_requests = 2\n"


def tree_hashes(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def descendants_of(pids: list[int]) -> list[psutil.Process]:
    """Live processes (not zombies) that slmops's fork server started for any of pids: the children that run its
    torch steps and the model builder."""
    found = []
    for pid in pids:
        try:
            tree = psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for proc in tree:
            try:
                parent = proc.parent()
                if (
                    proc.status() != psutil.STATUS_ZOMBIE
                    and parent is not None
                    and parent.pid != pid
                    and "multiprocessing.forkserver" in " ".join(parent.cmdline())
                ):
                    found.append(proc)
            except psutil.NoSuchProcess:
                pass
    return found


def assert_consistent(reg: Path, home: Path, names_allowed: set[str]) -> None:
    record = json.loads((reg / "foundry.local.modelinfo.json").read_text())
    recorded = {m["model_info"]["alias"]: Path(m["model_path"]) for m in record["models"]}
    folders = {p.name: p for p in (reg / "custom").iterdir() if not p.name.startswith(".")}
    assert set(recorded) == set(folders), (recorded, folders)
    assert set(recorded) <= names_allowed, recorded
    for name, folder in recorded.items():
        assert folder == reg / "custom" / name
        for f in ("genai_config.json", "inference_model.json", "slmops-entry.json", "slmops-manifest.json"):
            assert (folder / f).is_file(), (folder, f)
        manifest = json.loads((folder / "slmops-manifest.json").read_text())
        now = tree_hashes(folder)
        assert all(now.get(rel) == digest for rel, digest in manifest["files"].items()), f"{name} is incomplete"
    for where in (reg / "custom", home / "builds", home / "staged", home / "sources"):
        stale = [p.name for p in where.iterdir() if STALE_RE.match(p.name)] if where.is_dir() else []
        assert stale == [], (where, stale)


def test_kill_9_at_random_moments(tiny_llama, tiny_llama_int4, tmp_path):
    home, reg = tmp_path / "home", tmp_path / "reg"
    (tmp_path / "fast.toml").write_text(FAST_TOML)
    env = {**os.environ, "SLMOPS_HOME": str(home), "SLMOPS_REGISTRY_DIR": str(reg)}

    def cli(*args: object) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [*SLMOPS, *map(str, args)], env=env, cwd=NEUTRAL_DIR, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr
        return done

    # What nobody touches in the loop must come out byte-identical.
    cli("register", tiny_llama_int4.path, "--name", "keep")
    keep_out = tmp_path / "keep-out"
    cli("convert", tiny_llama, "--precision", "fp32", "-o", keep_out)
    untouched = {"keep": tree_hashes(reg / "custom" / "keep"), "keep-out": tree_hashes(keep_out)}

    fast = ["--config", tmp_path / "fast.toml"]
    victims = [
        ["register", tiny_llama_int4.path, "--name", "victim"],
        ["register", keep_out, "--name", "victim"],
        [*fast, "deploy", "--source", tiny_llama, "--name", "deployed", "--precision", "fp32"],
        [*fast, "deploy", "--source", tiny_llama, "--name", "gated", "--precision", "int4", "--max-kld", "0"],
        ["convert", tiny_llama, "--precision", "int8", "-o", tmp_path / "victim-out"],
        ["convert", tiny_llama, "--precision", "int4", "-o", tmp_path / "victim-out"],
        ["cache", "rm", "victim", "--yes"],
    ]
    rng = random.Random(20261123)

    def fresh_build() -> list[object]:  # a new build each time, so kills land inside the model builder too
        return [
            "convert",
            tiny_llama,
            "--precision",
            "int4",
            "--block-size",
            rng.choice(["16", "64", "128", "256"]),
            "--symmetric" if rng.random() < 0.5 else "--asymmetric",
            "--accuracy-level",
            str(rng.randint(0, 4)),
        ]

    # How long each command takes when left alone, so the kills can land anywhere in it.
    duration = {}
    for i, args in enumerate([*victims, fresh_build()]):
        start = time.perf_counter()
        subprocess.run([*SLMOPS, "-q", *map(str, args)], env=env, cwd=NEUTRAL_DIR, capture_output=True, timeout=600)
        duration[min(i, len(victims))] = time.perf_counter() - start
    killed = finished = 0
    for i in range(KILLS * 3):
        if killed >= KILLS:
            break
        which = len(victims) if i % 4 == 3 else rng.randrange(len(victims))
        args = fresh_build() if which == len(victims) else victims[which]
        proc = subprocess.Popen(
            [*SLMOPS, "-q", *map(str, args)],
            env=env,
            cwd=NEUTRAL_DIR,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            proc.wait(timeout=rng.uniform(0.1, 1.0) * duration[which])
            finished += 1
        except subprocess.TimeoutExpired:
            try:
                children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                children = []
            proc.kill()
            proc.wait()
            killed += 1
            deadline = time.time() + 10
            while (
                any(psutil.pid_exists(c) and psutil.Process(c).status() != psutil.STATUS_ZOMBIE for c in children)
                and time.time() < deadline
            ):
                time.sleep(0.1)
            alive = [c for c in children if psutil.pid_exists(c) and psutil.Process(c).status() != psutil.STATUS_ZOMBIE]
            assert alive == [], f"children of a killed slmops outlived it: {alive} ({args})"
    assert killed >= KILLS, f"only {killed} kills landed ({finished} commands finished first)"

    # The next commands clean up and find everything consistent.
    cli("cache", "ls")
    cli("builds", "ls")
    cli("convert", tiny_llama, "--precision", "fp32")
    assert_consistent(reg, home, {"keep", "victim", "deployed"})
    assert tree_hashes(reg / "custom" / "keep") == untouched["keep"]
    assert tree_hashes(keep_out) == untouched["keep-out"]
    victim_out = tmp_path / "victim-out"
    if victim_out.exists():
        manifest = json.loads((victim_out / "slmops-manifest.json").read_text())
        now = tree_hashes(victim_out)
        assert all(now.get(rel) == digest for rel, digest in manifest["files"].items())
    if (reg / "custom" / "deployed").exists():  # registered only after it passed validation
        assert (
            json.loads((reg / "custom" / "deployed" / "slmops-manifest.json").read_text())["options"]["precision"]
            == "fp32"
        )
    for name in ("keep", *[n for n in ("victim", "deployed") if (reg / "custom" / n).exists()]):
        r = run_cli("model", "run", name, "--prompt", "Hi", "--max-new-tokens", "2", env=env)
        assert r.rc == 0, r


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX signals")
def test_sigterm_ends_the_builder_and_leaves_nothing(tiny_llama, tmp_path):
    env = {**os.environ, "SLMOPS_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(
        [*SLMOPS, "-q", "convert", tiny_llama, "--precision", "fp32"],
        env=env,
        cwd=NEUTRAL_DIR,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not descendants_of([proc.pid]) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    builders = descendants_of([proc.pid])
    assert builders, "the model builder child never started"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    gone, alive = psutil.wait_procs(builders, timeout=10)
    assert alive == []
    builds = tmp_path / "home" / "builds"
    assert [p.name for p in builds.iterdir() if STALE_RE.match(p.name)] == []
    assert not [p for p in builds.iterdir() if p.is_dir() and not p.name.startswith(".")]


REGISTER_POINTS = [
    "register:staged",
    "register:trial",
    "register:unregistered",
    "replace:moved-aside",
    "register:swapped",
]
REMOVE_POINTS = ["remove:unregistered", "remove:moved-aside"]


@pytest.mark.parametrize("point", REGISTER_POINTS + REMOVE_POINTS)
def test_kill_at_each_step_of_a_replacement(point, tiny_llama, tiny_llama_int4, tmp_path):
    """SIGKILL at every step of replacing (or removing) a registration: the next command finds exactly one
    complete model under the name, the old or the new one (or, for a removal, none), and it answers."""
    from slmops.build import convert

    home, reg = tmp_path / "home", tmp_path / "reg"
    env = {**os.environ, "SLMOPS_HOME": str(home), "SLMOPS_REGISTRY_DIR": str(reg)}
    old, new = tiny_llama_int4.path, convert.convert(str(tiny_llama), {"precision": "int8"}).path
    assert run_cli("register", old, "--name", "m", env=env).rc == 0
    args = (
        ("register", new, "--name", "m") if point.startswith(("register", "replace")) else ("cache", "rm", "m", "--yes")
    )
    killed = run_cli(*args, env={**env, "SLMOPS_FAULT_AT": point})
    assert killed.rc == -signal.SIGKILL, killed
    assert run_cli("cache", "ls", env=env).rc == 0  # the next command reconciles
    assert_consistent(reg, home, {"m"})
    folder = reg / "custom" / "m"
    if folder.exists():
        key = json.loads((folder / "slmops-manifest.json").read_text())["key"]
        assert key in (tiny_llama_int4.key, json.loads((new / "slmops-manifest.json").read_text())["key"])
        r = run_cli("model", "run", "m", "--prompt", "Hi", "--max-new-tokens", "2", env=env)
        assert r.rc == 0, r
    else:
        assert point == "remove:moved-aside"
    assert run_cli("register", new, "--name", "m", env=env).rc == 0  # and the registry still takes changes
    assert_consistent(reg, home, {"m"})
