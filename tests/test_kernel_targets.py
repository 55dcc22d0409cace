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
    x = rng.standard_normal((3, cols)).astype(np.float32)
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


@pytest.mark.skipif(
    not all(shutil.which(t) for t in CROSS) or not shutil.which("cmake"),
    reason="no aarch64 cross toolchain or qemu-user (make cross-tools installs them)",
)
def test_the_arm64_library_computes_the_same_products_under_qemu(tmp_path):
    """kernel/ cross-compiled for aarch64 by CMake with kernel/cmake/aarch64-linux-gnu.cmake, its products run by the
    products driver under qemu-aarch64 with each of its kernels (NEON with SDOT, plain NEON, plain C++): the same
    bits as this machine's library, type by type."""
    build = tmp_path / "build-aarch64"
    toolchain = KERNEL_DIR / "cmake" / "aarch64-linux-gnu.cmake"
    configure = ["cmake", "-S", str(KERNEL_DIR), "-B", str(build), f"-DCMAKE_TOOLCHAIN_FILE={toolchain}"]
    subprocess.run(
        [*configure, "-DSLMOPS_KERNEL_TESTS=ON", "-DCMAKE_BUILD_TYPE=Release"], check=True, capture_output=True
    )
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True)
    library, driver = build / gguf_kernel.LIBRARY, build / "products"
    import slmops_kernel

    assert slmops_kernel.machine(library) == "aarch64" and slmops_kernel.machine() == "x86_64"
    # qemu's "max" CPU has dotprod (SDOT), a Cortex-A57 has not; baseline: the plain C++ kernels
    ways = [(["-cpu", "max"], {}, "neon-dotprod"), (["-cpu", "cortex-a57"], {}, "neon")]
    ways.append((["-cpu", "max"], {gguf_kernel.PRETEND_CPU: "baseline"}, "portable"))
    for kind in TYPES:
        c = case(kind, seed=1)
        files = {}
        for name in ("w", "x", "channels", "codes"):
            files[name] = tmp_path / f"{name}.bin"
            files[name].write_bytes(np.ascontiguousarray(c[name]).tobytes())
        out = tmp_path / "y.bin"
        args = [c["type"], c["groups"], c["k"], c["x"].shape[0], len(c["channels"]), 0]
        here = product(gguf_kernel.installed(), c, portable=False)
        for cpu, env, code in ways:
            run = subprocess.run(
                ["qemu-aarch64", *cpu, "-L", "/usr/aarch64-linux-gnu", str(driver), str(library), *map(str, args)]
                + [str(files[n]) for n in ("w", "x", "channels", "codes")] + [str(out)],
                capture_output=True, text=True, timeout=120, env={**os.environ, **env},
            )  # fmt: skip
            assert run.returncode == 0 and run.stdout.split() == [code], (kind, cpu, run.stdout, run.stderr)
            arm = np.fromfile(out, dtype=np.float32).reshape(c["x"].shape[0], -1)
            assert np.array_equal(arm, here), (kind, code)
