"""llama.cpp's own quantizers on a float checkpoint, the recipes a user would pick instead of slmops (issue 28):
convert_hf_to_gguf.py --outtype f32, llama-imatrix on the same calibration text as slmops, llama-quantize.

The tools are built once from the llama.cpp that the llama-cpp-python sdist vendors (the version make bench installs,
so the quantizer and the runtime that scores its files are the same llama.cpp), with the same CMake flags as that
wheel (CMAKE_ARGS from the Makefile: AMX off), into $SLMOPS_HOME/bench/llama.cpp-VERSION. Quantized files are kept
beside the source they came from.

    python benchmarks/llama_cpp_quants.py CHECKPOINT   # builds the tools if needed, writes and lists the files
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python, as the Makefile's bench target installs it
TOOLS = ("llama-quantize", "llama-imatrix")
# label, llama-quantize's type, whether the importance matrix is given
RECIPES = [
    ("llama.cpp Q4_0", "Q4_0", False),
    ("llama.cpp Q4_K_M", "Q4_K_M", False),
    ("llama.cpp Q4_K_M + imatrix", "Q4_K_M", True),
    ("llama.cpp Q5_K_M + imatrix", "Q5_K_M", True),
    ("llama.cpp Q6_K", "Q6_K", False),
    ("llama.cpp Q8_0", "Q8_0", False),
]
ANCHOR = "llama.cpp Q4_K_M + imatrix"  # the recipe the ratios are taken against: llama.cpp's best at Q4_K_M's bytes


def threads() -> int:
    from slmops.host.cpus import allowed_cpus

    return allowed_cpus()


def run(cmd: list, what: str, **kwargs) -> None:
    """cmd, its output kept in a file and shown (the end of it) only when it fails."""
    with tempfile.TemporaryFile() as log:
        done = subprocess.run([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, **kwargs)
        if done.returncode != 0:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"{what} failed (exit {done.returncode}):\n{tail}")


def tools() -> Path:
    """The folder holding llama.cpp's source (convert_hf_to_gguf.py, gguf-py) and bin/ with TOOLS, built once."""
    from slmops.config import home
    from slmops.host.fsutil import lock

    root = home() / "bench" / f"llama.cpp-{VERSION}"
    if all((root / "bin" / t).is_file() for t in TOOLS):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with lock(root):
        if all((root / "bin" / t).is_file() for t in TOOLS):
            return root
        shutil.rmtree(root, ignore_errors=True)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            start = time.perf_counter()
            print(f"  llama.cpp tools: fetching the llama-cpp-python {VERSION} sdist ...", flush=True)
            run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                 f"llama-cpp-python=={VERSION}", "-d", tmp],
                "pip download of the llama-cpp-python sdist",
            )  # fmt: skip
            sdist = next(tmp.glob("llama_cpp_python-*.tar.gz"))
            with tarfile.open(sdist) as tar:
                tar.extractall(tmp, filter="data")
            vendored = next(tmp.glob("llama_cpp_python-*/vendor/llama.cpp"))
            staged = root.with_name(root.name + ".tmp")
            shutil.rmtree(staged, ignore_errors=True)
            shutil.copytree(vendored, staged / "src")
            flags = os.environ.get("CMAKE_ARGS", "").split()
            build = tmp / "build"
            print(f"  llama.cpp tools: building {', '.join(TOOLS)} (a few minutes) ...", flush=True)
            run(
                ["cmake", "-S", staged / "src", "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                 "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF", *flags],
                "cmake configure of llama.cpp",
            )  # fmt: skip
            run(["cmake", "--build", build, "--target", *TOOLS, "-j", threads()], "cmake build of llama.cpp's tools")
            (staged / "bin").mkdir()
            for tool in TOOLS:
                shutil.copy2(next(build.rglob(tool)), staged / "bin" / tool)
            staged.rename(root)
            print(f"  llama.cpp tools: {time.perf_counter() - start:.0f} s", flush=True)
    return root


def quants(checkpoint: Path, calibration: Path) -> dict[str, Path]:
    """Every recipe's GGUF of checkpoint (written once to checkpoint's sibling folder NAME-llama.cpp)."""
    root = tools()
    out = checkpoint.with_name(f"{checkpoint.name}-llama.cpp-{VERSION}")
    out.mkdir(exist_ok=True)
    f32 = out / "f32.gguf"
    if not f32.is_file():
        print("  llama.cpp: convert_hf_to_gguf.py --outtype f32 ...", flush=True)
        run(
            [sys.executable, root / "src" / "convert_hf_to_gguf.py", checkpoint, "--outtype", "f32", "--outfile",
             f"{f32}.tmp"],
            "convert_hf_to_gguf.py",
        )  # fmt: skip
        os.replace(f"{f32}.tmp", f32)
    imatrix = out / "imatrix.gguf"
    if not imatrix.is_file():
        print(f"  llama.cpp: llama-imatrix on {calibration.name} ...", flush=True)
        staged = out / "imatrix.tmp.gguf"
        run(
            [root / "bin" / "llama-imatrix", "-m", f32, "-f", calibration, "-o", staged, "-c", "512", "--chunks", "8",
             "-t", threads()],
            "llama-imatrix",
        )  # fmt: skip
        os.replace(staged, imatrix)
    files = {}
    for label, kind, with_imatrix in RECIPES:
        target = out / f"{kind}{'-imatrix' if with_imatrix else ''}.gguf"
        if not target.is_file():
            start = time.perf_counter()
            staged = target.with_suffix(".tmp")
            extra = ["--imatrix", imatrix] if with_imatrix else []
            run([root / "bin" / "llama-quantize", *extra, f32, staged, kind, threads()], f"llama-quantize {kind}")
            os.replace(staged, target)
            print(f"  {label}: {time.perf_counter() - start:.0f} s", flush=True)
        files[label] = target
    return files


class LlamaCppChat:
    """A GGUF answering conversations greedily through llama-cpp-python, as slmops's OrtGenAIChat does (the same
    stream() contract, the prompt written by the same template as the reference build), so domain.score scores both
    with one code path. A schema constraint becomes llama.cpp's grammar for that schema."""

    def __init__(self, gguf: Path, reference_build: Path):
        from llama_cpp import Llama

        from slmops import templates
        from slmops.run.chat import load_template

        self.chosen = load_template(reference_build)
        self.info = templates.read_model_info(reference_build)
        self.llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads(), verbose=False)

    def stream(self, messages: list, options: dict, usage: dict):
        import json

        from llama_cpp import LlamaGrammar

        from slmops import templates
        from slmops.run.chat import safe_messages

        text = options.get("prompt") or templates.render(
            self.chosen.family, safe_messages(messages, self.chosen, self.info), self.chosen.default_system
        )
        tokens = self.llm.tokenize(text.encode(), add_bos=False, special=True)
        constraint = options.get("constraint")
        grammar = LlamaGrammar.from_json_schema(json.dumps(constraint.schema), verbose=False) if constraint else None
        new = int(options.get("max_new_tokens") or 256)
        answer = []
        for token in self.llm.generate(tokens, temp=0.0, top_k=1, grammar=grammar, reset=True):
            if token == self.llm.token_eos() or len(answer) >= new:
                break
            answer.append(token)
        yield self.llm.detokenize(answer).decode(errors="replace")


def calibration_file() -> Path:
    """slmops's shipped calibration text: llama-imatrix reads the same text, as many tokens as slmops does."""
    from importlib import resources

    return Path(str(resources.files("slmops").joinpath("data/calibration.txt")))


if __name__ == "__main__":
    for label, path in quants(Path(sys.argv[1]), calibration_file()).items():
        print(f"{label:<30} {path.stat().st_size / 1e6:8.1f} MB  {path}")
