# One command to set up and run, one to test. Every target that needs Python first makes sure that
# .venv exists and matches pyproject.toml + requirements.lock (it is rebuilt when either changes).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.harmonic-stamp
PROFILE ?= default
SWEEP  ?= ablation
PYTEST_ARGS ?=
# one thread per process is the fair setting on a small shared CPU; on a GPU machine: make bench BENCH_ARGS=
BENCH_ARGS ?= --threads 1
# the moment make started (before the environment is set up): make reproduce records its wall time from here
STARTED := $(shell date +%s)

.PHONY: help env test reproduce lab lint bench gpu-check sweep lock clean

help:
	@echo "make test       set up .venv and run the whole test suite"
	@echo "make reproduce  set up .venv and execute every notebook into results/ (PROFILE=$(PROFILE))"
	@echo "                PROFILE=coco COCO_ROOT=... or PROFILE=voc VOC_ROOT=VOCdevkit; DRY_RUN=1 checks the data"
	@echo "                PROFILE=quick: a first look in minutes; PROFILE=long: the default study at twice the length"
	@echo "                PROFILE=faster_rcnn: the paper's ablation on Faster R-CNN (about two hours here)"
	@echo "                PROFILE=faster_rcnn_long: its baseline and whole method at 4800 iterations (about 2.5 hours)"
	@echo "                PROFILE=faster_rcnn_data: the same pair on ten times the training images (about 1.7 hours)"
	@echo "                PROFILE=faster_rcnn_data_long: that pair at 9600 iterations (about 3 hours)"
	@echo "make lab        JupyterLab on localhost with the project's kernel"
	@echo "make bench      loss and training-step benchmarks -> results/bench.json"
	@echo "make gpu-check  on a CUDA machine: CUDA tests, GPU bench, a short training run -> results/gpu_check.json"
	@echo "make lint       ruff"
	@echo "make lock       re-pin requirements.lock and environment.yml from the current .venv"

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name harmonic --display-name "Python (harmonic)" >/dev/null
	@touch $(STAMP)

env: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

reproduce: $(STAMP)
	$(PY) -m harmonic reproduce --profile $(PROFILE) $(if $(COCO_ROOT),--coco-root $(COCO_ROOT),) $(if $(VOC_ROOT),--voc-root $(VOC_ROOT),) $(if $(DRY_RUN),--dry-run,) --started-at $(STARTED)

sweep: $(STAMP)
	$(PY) -m harmonic reproduce --sweep $(SWEEP)

bench: $(STAMP)
	$(PY) tools/bench.py --out results/bench.json --readme README.md $(BENCH_ARGS)

gpu-check: $(STAMP)
	$(PY) tools/gpu_check.py --out results/gpu_check.json

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --ip 127.0.0.1 --notebook-dir .

lint: $(STAMP)
	$(VENV)/bin/ruff check harmonic tests tools

lock: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | grep -v '^harmonic' > requirements.lock
	$(PY) tools/envfiles.py requirements.lock environment.yml

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
