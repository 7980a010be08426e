# stepwise: `make run` (set up, build the default models if missing, serve) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REPO := model_repository
CKPT := checkpoints
HOST ?= 0.0.0.0
PORT ?= 8001
DEVICE ?= auto

COMMON_SRC := training/__main__.py training/checkpoint.py training/registry.py training/reports.py
EXPORT_SRC := $(wildcard export/*.py)
LENET_SRC := $(COMMON_SRC) training/lenet.py training/train_classifier.py training/data/digits.py
CHAR_LM_SRC := $(COMMON_SRC) training/char_lm.py training/train_lm.py training/data/shakespeare.py

.PHONY: setup models run test evaluate lint protos clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[train,dev]'
	touch $@

# Each model is rebuilt only when its checkpoint or its sources are newer.
models: setup $(REPO)/lenet5/1/model.json $(REPO)/char_lstm/1/model.json

$(CKPT)/lenet5.pt: $(LENET_SRC) | $(STAMP)
	$(PY) -m training lenet5 --out $@

$(CKPT)/char_lstm.pt: $(CHAR_LM_SRC) | $(STAMP)
	$(PY) -m training char_lstm --out $@

$(REPO)/%/1/model.json: $(CKPT)/%.pt $(EXPORT_SRC)
	$(PY) -m export $< --repository $(REPO)

run: models
	$(PY) -m serving --model-repository $(REPO) --host $(HOST) --port $(PORT) --device $(DEVICE)

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

evaluate: models
	$(PY) tools/evaluate_served.py --model-repository $(REPO)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

protos: setup
	$(PY) protos/generate.py

clean:
	rm -rf $(CKPT) $(REPO) .pytest_cache
