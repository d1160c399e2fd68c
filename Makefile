# anomalyd: `make run` starts the daemon on config.toml, `make test` runs the whole test suite.
# Both set up everything first (scripts/setup.sh): system packages, a virtual environment, the project.
VENV ?= $(HOME)/.cache/anomalyd/venv
export VENV
ANOMALYD := $(VENV)/bin/anomalyd
PYTEST_ARGS ?=

.PHONY: setup setup-test run test demo lint bench

setup:
	@scripts/setup.sh

setup-test:
	@scripts/setup.sh --test

## The daemon on the shipped config (first run downloads the weights config.toml needs; offline, the error says
## which files to copy where).
run: setup
	$(ANOMALYD) weights fetch --if-missing --config config.toml
	$(ANOMALYD) run --config config.toml

## The daemon on the shipped config with the tiny test CLIP from ../shared (offline machines, demos).
demo: setup
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
