# Quick start: `make demo` (install + pre-train on embedded photos), `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo finetune-demo test bench clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m updetr_jax.main --config=configs/pretrain.py:demo --workdir=workdir/demo

workdir/demo/summary.json:
	$(MAKE) demo

# Fine-tunes the demo model from workdir/demo (made by `make demo` when missing) and
# from scratch; prints both evaluations.
finetune-demo: install workdir/demo/summary.json
	$(PY) -m updetr_jax.main --config=configs/finetune_coco.py:demo --workdir=workdir/finetune_demo

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) benchmarks/matching.py

clean:
	rm -rf $(VENV) workdir
