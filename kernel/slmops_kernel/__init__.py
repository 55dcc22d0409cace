"""slmops's GGUF kernel, compiled for this platform when the wheel was built (kernel/gguf_kernel.cc): an ONNX Runtime
custom operator library that slmops copies into the model folders it builds. It picks its kernels when loaded: AVX2
on an x86-64 CPU with AVX2, FMA and F16C; NEON on ARM64, with SDOT where the CPU has dotprod; plain C++ elsewhere."""

from __future__ import annotations

from pathlib import Path

LIBRARY = "libslmops_gguf.so"
# ELF e_machine -> platform.machine()'s name for it
ELF_MACHINES = {62: "x86_64", 183: "aarch64"}


def path() -> Path:
    """The library file."""
    return Path(__file__).with_name(LIBRARY)


def machine(library: Path | None = None) -> str | None:
    """The CPU architecture a library is built for (its ELF header says), or None if it is not an ELF it knows."""
    head = (library or path()).read_bytes()[:20]
    if head[:4] != b"\x7fELF":
        return None
    return ELF_MACHINES.get(int.from_bytes(head[18:20], "little" if head[5] == 1 else "big"))
