"""The GGUF kernel as shipped (kernel/: the slmops-kernel wheel): its portable code gives the AVX2 code's products bit
for bit, and the same source cross-compiled for ARM64 with Debian's toolchain gives them too, run under qemu-user."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from slmops.plugins import gguf_kernel

from .test_gguf_kernel import blocks_of

KERNEL_DIR = Path(__file__).resolve().parents[1] / "kernel"
TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
pytestmark = pytest.mark.skipif(gguf_kernel.installed() is None, reason="the slmops-kernel wheel is not installed")


def case(kind: str, seed: int = 0) -> dict:
    """One product's inputs: a random weight of the type in the kernel's layout, x with outlier channels (kept in
    float by the kernel), and what the product should be near."""
    rng = np.random.default_rng(seed)
    rows, cols = 72, 512 if kind.endswith("_K") else 160
    form, values, _ = blocks_of(kind, rows, cols, rng)
    kind_id = gguf_kernel.ggml_type(form)
    weight = np.ascontiguousarray(gguf_kernel.grouped(form, kind_id))
    x = rng.standard_normal((6, cols)).astype(np.float32)  # 6 rows: the AVX2 code takes 4 at once, then 1 by 1
    x[:, [7, 40, 41]] *= 40
    channels = np.array([7, 40, cols - 1], dtype=np.int64)
    codes = np.ascontiguousarray(gguf_kernel.outlier_codes(form, kind_id, channels))
    return dict(
        type=kind_id, w=weight, groups=rows // 8, k=cols, x=x, channels=channels, codes=codes, exact=x @ values.T
    )


def product(library: Path, c: dict, portable: bool) -> np.ndarray:
    """The library's product on this machine (SlmopsMatMulGGML, no ONNX Runtime)."""
    lib = ctypes.CDLL(str(library))
    p = ctypes.c_void_p
    lib.SlmopsMatMulGGML.argtypes = [ctypes.c_int64, p, ctypes.c_int64, ctypes.c_int64, p, ctypes.c_int64, p]
    lib.SlmopsMatMulGGML.argtypes += [ctypes.c_int64, p, p, ctypes.c_int]
    y = np.zeros((c["x"].shape[0], c["groups"] * 8), np.float32)
    lib.SlmopsMatMulGGML(
        c["type"], c["w"].ctypes.data, c["groups"], c["k"], c["x"].ctypes.data, c["x"].shape[0],
        c["channels"].ctypes.data, len(c["channels"]), c["codes"].ctypes.data, y.ctypes.data, int(portable),
    )  # fmt: skip
    return y


@pytest.mark.parametrize("kind", TYPES)
def test_the_portable_kernels_give_the_avx2_products_bit_for_bit(kind):
    library = gguf_kernel.installed()
    if gguf_kernel.code(library) != "avx2":
        pytest.skip("this CPU runs the portable kernels only")
    c = case(kind)
    fast, portable = product(library, c, portable=False), product(library, c, portable=True)
    assert np.array_equal(fast, portable)
    scale = np.abs(c["exact"]).max()
    assert np.abs(fast - c["exact"]).max() < 0.05 * scale  # the int8 product of the weights, not noise


def test_the_library_says_which_code_it_runs(monkeypatch):
    library = gguf_kernel.installed()
    monkeypatch.setenv(gguf_kernel.PRETEND_CPU, "baseline")
    assert gguf_kernel.code(library) == "portable"
    assert gguf_kernel.why_not() == "this CPU lacks AVX2, FMA or F16C, which the kernel's fast code needs"
    assert gguf_kernel.library() is None  # a build here then writes the portable graph (MatMulNBits)


CROSS = ("aarch64-linux-gnu-g++", "qemu-aarch64")


@pytest.fixture(scope="module")
def arm64(tmp_path_factory) -> tuple[Path, Path]:
    """kernel/ cross-compiled for aarch64 by CMake with kernel/cmake/aarch64-linux-gnu.cmake: the library and the
    products driver (kernel/tests/products.cc), built once for the tests below."""
    if not all(shutil.which(t) for t in CROSS) or not shutil.which("cmake"):
        pytest.skip("no aarch64 cross toolchain or qemu-user (make cross-tools installs them)")
    build = tmp_path_factory.mktemp("build-aarch64")
    toolchain = KERNEL_DIR / "cmake" / "aarch64-linux-gnu.cmake"
    configure = ["cmake", "-S", str(KERNEL_DIR), "-B", str(build), f"-DCMAKE_TOOLCHAIN_FILE={toolchain}"]
    subprocess.run(
        [*configure, "-DSLMOPS_KERNEL_TESTS=ON", "-DCMAKE_BUILD_TYPE=Release"], check=True, capture_output=True
    )
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True)
    library, driver = build / gguf_kernel.LIBRARY, build / "products"
    import slmops_kernel

    assert slmops_kernel.machine(library) == "aarch64" and slmops_kernel.machine() == "x86_64"
    return library, driver


# qemu's "max" CPU has dotprod (SDOT), a Cortex-A57 has not; baseline: the plain C++ kernels
QEMU_WAYS = [(["-cpu", "max"], {}, "neon-dotprod"), (["-cpu", "cortex-a57"], {}, "neon")]
QEMU_WAYS.append((["-cpu", "max"], {gguf_kernel.PRETEND_CPU: "baseline"}, "portable"))


def under_qemu(driver: Path, library: Path, args: list, cpu: list[str], env: dict) -> str:
    """The products driver's run under qemu-aarch64; what it printed (the kernels that ran)."""
    run = subprocess.run(
        ["qemu-aarch64", *cpu, "-L", "/usr/aarch64-linux-gnu", str(driver), str(library), *map(str, args)],
        capture_output=True, text=True, timeout=120, env={**os.environ, **env},
    )  # fmt: skip
    assert run.returncode == 0, (args[:2], cpu, run.stdout, run.stderr)
    return run.stdout.strip()


def test_the_arm64_library_computes_the_same_products_under_qemu(arm64, tmp_path):
    """The products driver under qemu-aarch64 with each of the ARM64 library's kernels (NEON with SDOT, plain NEON,
    plain C++): the same bits as this machine's library, type by type."""
    library, driver = arm64
    for kind in TYPES:
        c = case(kind, seed=1)
        files = {}
        for name in ("w", "x", "channels", "codes"):
            files[name] = tmp_path / f"{name}.bin"
            files[name].write_bytes(np.ascontiguousarray(c[name]).tobytes())
        out = tmp_path / "y.bin"
        args = [c["type"], c["groups"], c["k"], c["x"].shape[0], len(c["channels"]), 0]
        here = product(gguf_kernel.installed(), c, portable=False)
        for cpu, env, code in QEMU_WAYS:
            paths = [files[n] for n in ("w", "x", "channels", "codes")] + [out]
            assert under_qemu(driver, library, args + paths, cpu, env) == code, (kind, cpu)
            arm = np.fromfile(out, dtype=np.float32).reshape(c["x"].shape[0], -1)
            assert np.array_equal(arm, here), (kind, code)


# The attention op's rows: (rotary dims of a 64-wide head, interleaved); 0: no rotary
ROTARY = [(64, False), (32, False), (64, True), (0, False)]


def attention_case(dims: int, interleaved: bool, seed: int = 0) -> dict:
    """One query row against 37 keys (not a whole number of the kernels' 8), a 64-wide head, RoPE caches of the
    keys' positions as a Llama's (base 10,000)."""
    rng = np.random.default_rng(seed)
    h, n = 64, 37
    angles = np.arange(n)[:, None] * 10000.0 ** (-np.arange(max(dims // 2, 1)) / max(dims // 2, 1))
    return dict(
        q=rng.standard_normal(h).astype(np.float32) * 2,
        k=rng.standard_normal((n, h)).astype(np.float32) * 2,
        v=rng.standard_normal((n, h)).astype(np.float32),
        cos=np.cos(angles).astype(np.float32), sin=np.sin(angles).astype(np.float32),
        h=h, n=n, dims=dims, interleaved=int(interleaved), scale=np.float32(1 / np.sqrt(h) * 1.5),
    )  # fmt: skip


def attention_row(library: Path, c: dict, portable: bool) -> np.ndarray:
    """The library's attention row on this machine (SlmopsAttentionRow, no ONNX Runtime)."""
    lib = ctypes.CDLL(str(library))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.SlmopsAttentionRow.argtypes = [p, p, p, i64, i64, p, p, i64, ctypes.c_int, ctypes.c_float, p, ctypes.c_int]
    out = np.zeros(c["h"], np.float32)
    lib.SlmopsAttentionRow(
        c["q"].ctypes.data, c["k"].ctypes.data, c["v"].ctypes.data, c["h"], c["n"], c["cos"].ctypes.data,
        c["sin"].ctypes.data, c["dims"], c["interleaved"], c["scale"], out.ctypes.data, int(portable),
    )  # fmt: skip
    return out


def rotated(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, dims: int, interleaved: bool) -> np.ndarray:
    if not dims:
        return x
    out, half = x.copy(), dims // 2
    if interleaved:
        even, odd = x[0:dims:2], x[1:dims:2]
        out[0:dims:2], out[1:dims:2] = even * cos - odd * sin, odd * cos + even * sin
    else:
        a, b = x[:half], x[half:dims]
        out[:half], out[half:dims] = a * cos - b * sin, b * cos + a * sin
    return out


def attention_reference(c: dict) -> np.ndarray:
    """numpy in float64: q at the last position, each key at its own, keys and values held in fp16."""
    d, il = c["dims"], c["interleaved"]
    q = rotated(c["q"].astype(np.float64), c["cos"][-1], c["sin"][-1], d, il)
    k = np.stack([rotated(c["k"][i], c["cos"][i], c["sin"][i], d, il) for i in range(c["n"])])
    k, v = k.astype(np.float16).astype(np.float64), c["v"].astype(np.float16).astype(np.float64)
    s = k @ q * float(c["scale"])
    e = np.exp(s - s.max())
    return e / e.sum() @ v


@pytest.mark.parametrize("dims,interleaved", ROTARY)
def test_the_attention_row_is_the_same_in_portable_and_avx2_code(dims, interleaved):
    library = gguf_kernel.installed()
    c = attention_case(dims, interleaved)
    fast, portable = attention_row(library, c, portable=False), attention_row(library, c, portable=True)
    assert np.abs(portable - attention_reference(c)).max() < 1e-4 * np.abs(c["v"]).max()
    if gguf_kernel.code(library) != "avx2":
        pytest.skip("this CPU runs the portable kernels only")
    assert np.array_equal(fast, portable)


def test_the_arm64_library_computes_the_same_attention_under_qemu(arm64, tmp_path):
    """The attention op's row (RoPE, fp16 keys and values, softmax, weighted sum) from the ARM64 library under
    qemu-aarch64 gives this machine's bits, with each of its kernels."""
    library, driver = arm64
    here = gguf_kernel.installed()
    for dims, interleaved in ROTARY:
        c = attention_case(dims, interleaved, seed=2)
        files = {}
        for name in ("q", "k", "v", "cos", "sin"):
            files[name] = tmp_path / f"{name}.bin"
            files[name].write_bytes(np.ascontiguousarray(c[name]).tobytes())
        out = tmp_path / "out.bin"
        args = ["attention", c["h"], c["n"], dims, c["interleaved"], repr(float(c["scale"])), 0]
        args += [files[n] for n in ("q", "k", "v", "cos", "sin")] + [out]
        for cpu, env, code in QEMU_WAYS:
            assert under_qemu(driver, library, args, cpu, env) == code, (dims, cpu)
            assert np.array_equal(np.fromfile(out, dtype=np.float32), attention_row(here, c, portable=False)), (
                dims,
                code,
            )
