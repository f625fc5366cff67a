# Quick start: `make demo` (install + pre-train on embedded photos), `make test`.
# What each target runs and measures: README.md and docs/results/.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo pretext-demo finetune-demo oneshot-demo compare-mini compare-lookup test lint format bench clean

# The tested pins (requirements*.txt), then the package itself, editable (console
# scripts updetr-train, updetr-predict, ... in .venv/bin; see pyproject.toml).
$(STAMP): requirements.txt requirements-dev.txt requirements-torch.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m updetr_jax.main --config=configs/pretrain.py:demo --workdir=workdir/demo

# Random query patch detection learned where the pixels decide it (the learnability
# benchmark's lookup, M = 4, one seed, about 10 minutes on 2 cores): curves.png,
# table.md and each run's patch_detection.png in workdir/pretext_demo.
pretext-demo: install
	$(PY) benchmarks/pretext_learnability.py --workdir=workdir/pretext_demo --style=rotated_ramp \
	    --arms=patchnorm_groupmatch_content_value_pos_one_query_lr4e-4 --seeds=0 --steps=8000 --every=1000

# UP-DETR pre-training vs scratch on the built-in miniature benchmark (configs/compare.py):
# stage-0 CNN, pre-training, fine-tuning over seeds and label fractions; results.json,
# results.txt (mean +- std, paired differences) and curves.png in workdir/compare.
compare-mini: install
	$(PY) -m updetr_jax.compare --config=configs/compare.py:mini --workdir=workdir/compare \
	    --config.compilation_cache_dir=workdir/.xla_cache

# With a pre-training that learned its pretext (configs/compare.py:lookup): the
# release's pre-training, the lookup pre-training, scratch and scratch with the lookup
# arm's decoder, 5 seeds; workdir/compare_lookup (docs/results/pretraining_vs_scratch.md).
compare-lookup: install
	$(PY) -m updetr_jax.compare --config=configs/compare.py:lookup --workdir=workdir/compare_lookup \
	    --config.compilation_cache_dir=workdir/.xla_cache

# Its short form (8.5 minutes measured on a fresh clone): UP-DETR vs scratch, 3 seeds, with
# the noise level.
finetune-demo: install
	$(PY) -m updetr_jax.compare --config=configs/compare.py:demo --workdir=workdir/finetune_demo \
	    --config.compilation_cache_dir=workdir/.xla_cache

# One-shot detection on the miniature (configs/compare.py:oneshot): seen / unseen
# classes, UP-DETR vs scratch, 3 seeds, AP50 over 5 query runs; workdir/oneshot_demo
# (22 minutes measured on a fresh clone, 2 cores).
oneshot-demo: install
	$(PY) -m updetr_jax.compare --config=configs/compare.py:oneshot --workdir=workdir/oneshot_demo \
	    --config.compilation_cache_dir=workdir/.xla_cache

test: install
	$(PY) -m pytest -q tests

# One style (2-space indentation, pyproject.toml [tool.ruff]): `make format` applies it.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PY) benchmarks/matching.py

clean:
	rm -rf $(VENV) workdir
