"""`slmops serve` under load, side by side with llama.cpp's server on the same model, in one run.

The default model (SmolLM2-135M-Instruct): slmops serves the int4 build that `make demo` deploys, through Foundry
Local's runtime and through ORT GenAI (two requests at once); llama.cpp's server (llama-cpp-python's, where it is
installed) serves the embedded Q4_1 GGUF it came from. Each is asked the same streamed chat requests with the
real openai client at 1, 4 and 8 concurrent clients, on loopback. Printed: aggregate completion tokens/s, TTFT
p50/p95, and the server's peak RSS. Bounded: ROUNDS requests per client, MAX_TOKENS each, a deadline per level."""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from slmops.host.cpus import allowed_cpus

QUESTIONS = [
    "What is the capital of France?",
    "Name three rivers in Europe.",
    "What is a prime number?",
    "Give me a tip for writing clean code.",
    "Why is the sky blue?",
    "What does a CPU do?",
    "Suggest a name for a cat.",
    "What is the boiling point of water?",
]
CLIENTS = (1, 4, 8)
ROUNDS, MAX_TOKENS, LEVEL_DEADLINE_S = 2, 64, 120


class ServerProcess:
    def __init__(self, label: str, cmd: list[str], ready: str, env: dict[str, str]):
        self.label = label
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.base_url = ""
        deadline = time.time() + 300
        for line in self.proc.stderr:
            if found := re.search(ready, line):
                self.base_url = found[1]
                break
            if time.time() > deadline:
                break
        if not self.base_url:
            self.stop()
            raise RuntimeError(f"{label} did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()  # keep the pipe drained

    def peak_rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status")
        found = re.search(r"VmHWM:\s+(\d+)", status.read_text()) if status.exists() else None
        return int(found[1]) / 1024 if found else float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def one_request(client, model: str, question: str) -> tuple[float, int]:
    """(TTFT in seconds, completion pieces) of one streamed chat request."""
    start, first, pieces = time.perf_counter(), None, 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - start
            pieces += 1
    return first or float("nan"), pieces


def load(server: ServerProcess, model: str, clients: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key="bench", max_retries=0, timeout=LEVEL_DEADLINE_S)
    one_request(client, model, "Hello")  # warm-up
    jobs = [QUESTIONS[i % len(QUESTIONS)] for i in range(clients * ROUNDS)]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda q: one_request(client, model, q), jobs, timeout=LEVEL_DEADLINE_S))
    wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results if r[1])
    return {
        "server": server.label,
        "clients": clients,
        "requests": len(jobs),
        "empty": sum(not r[1] for r in results),
        "tok_s": sum(r[1] for r in results) / wall,
        "ttft_p50_ms": 1000 * statistics.median(ttfts),
        "ttft_p95_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
        "peak_rss_mb": server.peak_rss_mb(),
    }


def slmops_model(registry: Path, env: dict[str, str]) -> str:
    from slmops.build import candidates, convert

    options = dict(candidates.CANDIDATES)["int4 gguf"]  # what `make demo` deploys for the default model
    build = convert.convert(None, options)
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from slmops.cli import main; main()",
            "-q",
            "register",
            str(build.path),
            "--name",
            "smol",
        ],
        env=env,
        check=True,
    )
    return "smol"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    from slmops.build import sources

    registry = Path(tempfile.mkdtemp(prefix="slmops-bench-serve-"))
    env = {**os.environ, "SLMOPS_REGISTRY_DIR": str(registry)}
    slmops = [sys.executable, "-c", "from slmops.cli import main; main()", "serve", "--port", "0"]
    ready = r"OpenAI API at (http://\S+/v1)"
    servers = [
        ("slmops serve (Foundry Local runtime)", [*slmops, "smol"], ready, "smol"),
        (
            "slmops serve (ORT GenAI, --parallel 2)",
            [*slmops, "smol", "--engine", "ort-genai", "--parallel", "2"],
            ready,
            "smol",
        ),
    ]
    try:
        import llama_cpp.server  # noqa: F401

        servers.append(
            (
                "llama.cpp server (llama-cpp-python, Q4_1)",
                [
                    sys.executable,
                    "-m",
                    "llama_cpp.server",
                    "--model",
                    str(sources.default_gguf()),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "8391",
                    "--n_ctx",
                    "2048",
                    "--n_threads",
                    str(allowed_cpus()),
                    "--interrupt_requests",
                    "False",
                ],  # its default cuts a stream short when the next request comes
                r"Uvicorn running on (http://\S+)",
                "llama",
            )
        )
    except ImportError:
        print(
            "llama-cpp-python[server] is not installed: no llama.cpp column (make bench installs it)", file=sys.stderr
        )
    model = slmops_model(registry, env)
    rows = []
    for label, cmd, pattern, name in servers:
        server = ServerProcess(label, cmd, pattern, env)
        if "llama" in label:
            server.base_url += "/v1"
        try:
            for clients in CLIENTS:
                rows.append(load(server, model if name == "smol" else name, clients))
                print(f"  {label}: {clients} clients done", file=sys.stderr)
        finally:
            server.stop()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    llama = {r["clients"]: r for r in rows if r["server"].startswith("llama")}
    print(
        f"{'server':<42} {'clients':>7} {'empty':>5} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p95':>9} {'RSS MB':>7} "
        f"{'tok/s vs llama.cpp':>19}"
    )
    for r in rows:
        ratio = f"{r['tok_s'] / llama[r['clients']]['tok_s']:.2f}x" if r["clients"] in llama else "-"
        print(
            f"{r['server']:<42} {r['clients']:>7} {r['empty']:>5} {r['tok_s']:>7.1f} {r['ttft_p50_ms']:>7.0f}ms {r['ttft_p95_ms']:>7.0f}ms "
            f"{r['peak_rss_mb']:>7.0f} {ratio:>19}"
        )
    print(
        f"\n{ROUNDS} streamed requests per client, {MAX_TOKENS} tokens at most, greedy; loopback; "
        f"{allowed_cpus()} CPU cores. tok/s: all clients' completion tokens over the level's wall time;\n"
        "empty: answers with no text (cut or failed)."
    )


if __name__ == "__main__":
    main()
