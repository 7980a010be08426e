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

# The default models and their default (quick) budgets; `make quality` (issue 3) trains longer.
MODELS := lenet5 resnet18 seq_digits char_lstm char_gru char_rnn captioner
FLAGS_resnet18 := --width 0.25 --epochs 10
FLAGS_char_lstm := --steps 800
FLAGS_char_gru := --steps 500
FLAGS_char_rnn := --steps 500
FLAGS_captioner := --train-scenes 10000 --epochs 10

COMMON_SRC := training/__main__.py training/checkpoint.py training/registry.py \
	training/reports.py training/loop.py training/flags.py training/cnn_config.py \
	training/char_lm.py \
	training/rnn_cells.py
EXPORT_SRC := $(wildcard export/*.py)
CNN_SRC := $(COMMON_SRC) training/lenet.py training/alexnet.py training/vgg.py \
	training/googlenet.py training/resnet.py training/densenet.py training/seq_digits.py \
	training/train_classifier.py training/data/digits.py
LM_SRC := $(COMMON_SRC) training/train_lm.py training/data/shakespeare.py
CAPTION_SRC := $(COMMON_SRC) training/captioner.py training/caption_metrics.py \
	training/train_captioner.py training/data/scenes.py

.PHONY: setup models run test evaluate model-card lint protos clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[train,dev]'
	touch $@

# Each model is rebuilt only when its checkpoint or its sources are newer.
models: setup $(foreach m,$(MODELS),$(REPO)/$(m)/1/model.json)

$(CKPT)/lenet5.pt $(CKPT)/resnet18.pt $(CKPT)/seq_digits.pt: $(CNN_SRC)
$(CKPT)/char_lstm.pt $(CKPT)/char_gru.pt $(CKPT)/char_rnn.pt: $(LM_SRC)
$(CKPT)/captioner.pt: $(CAPTION_SRC)

$(CKPT)/%.pt: | $(STAMP)
	$(PY) -m training $* --out $@ $(FLAGS_$*)

$(REPO)/%/1/model.json: $(CKPT)/%.pt $(EXPORT_SRC)
	$(PY) -m export $< --repository $(REPO)

run: models
	$(PY) -m serving --model-repository $(REPO) --host $(HOST) --port $(PORT) --device $(DEVICE)

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

evaluate: models
	$(PY) tools/evaluate_served.py --model-repository $(REPO)

model-card: models
	$(PY) tools/model_card.py --model-repository $(REPO)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

protos: setup
	$(PY) protos/generate.py

clean:
	rm -rf $(CKPT) $(REPO) .pytest_cache
