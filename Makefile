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
# The torch `make setup` installs, and pip's flags for finding it (Dockerfile.train sets
# both: the CPU build from a wheel folder or index).
TORCH ?= torch==2.13.0
TORCH_PIP_FLAGS ?=

# Two budgets, one recipe. `make models` trains the default models at the default
# (quick, <= 15 min) budget into $(REPO); `make quality` trains every registered name
# at the full budget into $(QUALITY_REPO) and writes docs/MODEL_CARD.md.
MODELS := lenet5 resnet18 seq_digits char_lstm char_gru char_rnn captioner
CNN_NAMES := lenet5 alexnet vgg11 vgg13 vgg16 vgg19 googlenet resnet18 resnet34 resnet50 \
	densenet seq_digits
LM_NAMES := char_lstm char_gru char_rnn
# The slowest and least certain first.
ALL_MODELS := char_lstm captioner $(CNN_NAMES) char_gru char_rnn
BUDGET ?= default
QUALITY_CKPT := checkpoints/full
QUALITY_REPO := model_repository_full

FLAGS_default_resnet18 := --width 0.25 --epochs 10
FLAGS_default_char_lstm := --steps 800
FLAGS_default_char_gru := --steps 500
FLAGS_default_char_rnn := --steps 500
FLAGS_default_captioner := --train-scenes 10000 --epochs 10

FULL_LM := --hidden-size 512 --lr 5e-3 --steps 3000 --bf16 --eval-every 250
FLAGS_full_lenet5 := --epochs 40
FLAGS_full_alexnet := --width 0.5 --epochs 20
FLAGS_full_vgg11 := --width 0.5 --epochs 20
FLAGS_full_vgg13 := --width 0.5 --epochs 20
FLAGS_full_vgg16 := --width 0.5 --epochs 20
FLAGS_full_vgg19 := --width 0.5 --epochs 20
FLAGS_full_googlenet := --width 0.25 --epochs 20
FLAGS_full_resnet18 := --width 0.5 --epochs 15
FLAGS_full_resnet34 := --width 0.25 --epochs 15
FLAGS_full_resnet50 := --width 0.25 --epochs 15
FLAGS_full_densenet := --width 0.25 --epochs 15
FLAGS_full_seq_digits := --epochs 60
FLAGS_full_char_lstm := $(FULL_LM)
FLAGS_full_char_gru := $(FULL_LM)
FLAGS_full_char_rnn := $(FULL_LM)
FLAGS_full_captioner := --train-scenes 30000 --epochs 12

COMMON_SRC := training/__main__.py training/checkpoint.py training/registry.py \
	training/reports.py training/loop.py training/flags.py training/cnn_config.py \
	training/char_lm.py \
	training/rnn_cells.py
EXPORT_SRC := $(wildcard export/*.py)
CNN_SRC := $(COMMON_SRC) training/lenet.py training/alexnet.py training/vgg.py \
	training/googlenet.py training/resnet.py training/densenet.py training/seq_digits.py \
	training/train_classifier.py training/distributed.py training/data/digits.py
LM_SRC := $(COMMON_SRC) training/train_lm.py training/data/shakespeare.py
CAPTION_SRC := $(COMMON_SRC) training/captioner.py training/caption_metrics.py \
	training/train_captioner.py training/data/scenes.py

.PHONY: setup models quality run run-full test fuzz bench bench-quick evaluate evaluate-full \
	model-card lint protos clean compose-test

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PIP_FLAGS) '$(TORCH)'
	$(PY) -m pip install --quiet -e '.[train,dev]'
	touch $@

# Each model is rebuilt only when its checkpoint or its sources are newer.
models: setup $(foreach m,$(MODELS),$(REPO)/$(m)/1/model.json)

$(foreach m,$(CNN_NAMES),$(CKPT)/$(m).pt): $(CNN_SRC)
$(foreach m,$(LM_NAMES),$(CKPT)/$(m).pt): $(LM_SRC)
$(CKPT)/captioner.pt: $(CAPTION_SRC)

$(CKPT)/%.pt: | $(STAMP)
	$(PY) -m training $* --out $@ --quiet $(FLAGS_$(BUDGET)_$*)

$(REPO)/%/1/model.json: $(CKPT)/%.pt $(EXPORT_SRC)
	$(PY) -m export $< --repository $(REPO)

# Full budgets for every name (about 2 hours on a 2-core machine; not in CI), then the card.
quality: setup
	$(MAKE) models MODELS="$(ALL_MODELS)" BUDGET=full CKPT=$(QUALITY_CKPT) REPO=$(QUALITY_REPO)
	$(PY) tools/model_card.py --model-repository $(QUALITY_REPO) --budget full \
		--command "make quality"

run: models
	$(PY) -m serving --model-repository $(REPO) --host $(HOST) --port $(PORT) --device $(DEVICE)

run-full: quality
	$(PY) -m serving --model-repository $(QUALITY_REPO) --host $(HOST) --port $(PORT) --device $(DEVICE)

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# The docker-compose deployment on a real Docker engine (tests/test_compose_stack.py): the
# engine that runs, or dockerd started as root; skips, saying why, where none can run.
compose-test: setup
	@reason=$$($(PY) -m deploy.docker_engine); \
	if [ -n "$$reason" ]; then echo "compose-test: skipped: $$reason"; \
	else $(PY) -m pytest -q -s -m docker tests/test_compose_stack.py; fi

# Not in CI: 2,500 fresh random examples for each of the six fuzz tests (15,000 calls, and
# the requests on the ModelStreamInfer streams besides: about 26,000 requests).
fuzz: setup
	STEPWISE_FUZZ_EXAMPLES=2500 STEPWISE_FUZZ_RANDOM=1 STEPWISE_FUZZ_REPORT=fuzz-report.json \
		$(PY) -m pytest -q tests/test_fuzz.py; status=$$?; \
		cat fuzz-report.json; exit $$status

# Side by side, one run: the in-process limit, the transport ceiling, stepwise served, the
# PyTorch eager baseline, step-wise against recompute; writes docs/BENCHMARKS.md.
bench: models
	$(PY) -m bench

bench-quick: models
	$(PY) -m bench --quick

evaluate: models
	$(PY) tools/evaluate_served.py --model-repository $(REPO)

evaluate-full: quality
	$(PY) tools/evaluate_served.py --model-repository $(QUALITY_REPO)

model-card: models
	$(PY) tools/model_card.py --model-repository $(REPO) --budget default \
		--out docs/MODEL_CARD_DEFAULT.md --command "make models && make model-card"

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

protos: setup
	$(PY) protos/generate.py

clean:
	rm -rf $(CKPT) $(REPO) $(QUALITY_REPO) .pytest_cache
