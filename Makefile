# headwater: make demo | make test | make bench | make bench-extras | make bench-lm | make bench-defaults | make bench-gpt2 | make bench-scale | make bench-metagradient | make bench-lm-metagradient | make stress-distributed
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast bench bench-extras bench-lm bench-lm-metagradient bench-defaults bench-gpt2 bench-scale stress-distributed lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/headwater demo

# Lint and format check first (seconds), then the suite with 1 torch thread and again, but
# for the tests marked slow (subprocess CLI runs, torchrun, retraining: 2.4 of its 4 minutes),
# with 2 threads (no result may depend on the split), so that the whole stays under 10
# minutes on 2 cores.
test: setup lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --threads 1
	OMP_NUM_THREADS=2 $(PY) -m pytest -q --threads 2 -m "not slow"

# Everything but the tests marked slow (subprocess CLI runs, torchrun, retraining): under a minute.
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The benchmarks run headwater beside the reference libraries in one process: they live
# in a separate bench-only environment (.venv-bench; pyDVL needs numpy<2).
bench:
	bash bench/setup_peers.sh
	.venv-bench/bin/python -m bench.run --threads 1 --warmup

# Mislabel detection, TracIn, linearised Laplace and unlearning beside the peers
# (bench/extras_results.md); same environment.
bench-extras:
	bash bench/setup_peers.sh
	.venv-bench/bin/python -m bench.extras --threads 1 --warmup

# Influence on a small causal transformer language model, headwater vs Kronfluence (bench/lm.py).
bench-lm:
	bash bench/setup_peers.sh
	.venv-bench/bin/python -m bench.lm --threads 1 --warmup

# Exact metagradients of recorded runs vs influence and TracIn, Kronfluence's EK-FAC and
# Captum's TracInCP beside them, single-model LDS: the digits MLP
# (bench/metagradient_results.md) and CNN (bench/metagradient_cnn_results.md), and models
# trained in train mode, a BatchNorm CNN and an MLP with dropout
# (bench/metagradient_train_mode_results.md, headwater only); about 45 minutes.
MLP_RECIPES := mlp-sgd-sharp mlp-sgd-smooth mlp-sgd-smooth-const mlp-adam-sharp mlp-adam-smooth mlp-adam-smooth-slow
CNN_RECIPES := cnn-sgd-sharp cnn-sgd-smooth cnn-adam-sharp cnn-adam-smooth
TRAIN_MODE_RECIPES := cnn-bn-sgd-smooth cnn-bn-adam-smooth mlp-dropout-sgd-smooth
bench-metagradient:
	bash bench/setup_peers.sh
	.venv-bench/bin/python -m bench.metagradient --threads 1 --peers --recipes $(MLP_RECIPES)
	.venv-bench/bin/python -m bench.metagradient --threads 1 --peers --recipes $(CNN_RECIPES) \
		--out bench/metagradient_cnn_results.md
	.venv-bench/bin/python -m bench.metagradient --threads 1 --recipes $(TRAIN_MODE_RECIPES) \
		--out bench/metagradient_train_mode_results.md
	.venv-bench/bin/python -m bench.metagradient_floor --threads 1
# Exact metagradients on the causal LM of bench-lm: three recipes, 50 queries, single-model
# LDS at 1% / 5% (bench/lm_metagradient_results.md; headwater only, about 45 minutes).
bench-lm-metagradient: setup
	$(PY) -m bench.lm_metagradient --threads 1
# Every curvature at its defaults on the digits MLP and CNN, the damping rule's held-out
# choice, CG vs EK-FAC (bench/defaults_results.md); headwater only, one thread.
bench-defaults: setup
	OMP_NUM_THREADS=1 $(PY) -m bench.defaults

# The 2-process gloo test 20 times in a row (RUNS=n to change): prints how many passed;
# a failing run's pytest output, with both ranks' own output, is kept in stress-logs/.
RUNS ?= 20
stress-distributed: setup
	@mkdir -p stress-logs; passed=0; \
	for i in $$(seq $(RUNS)); do \
	  if OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider tests/test_distributed.py \
	       > stress-logs/run$$i.log 2>&1; then passed=$$((passed + 1)); rm stress-logs/run$$i.log; \
	  else echo "run $$i failed: stress-logs/run$$i.log"; fi; \
	done; echo "stress-distributed: $$passed of $(RUNS) runs passed"; test $$passed -eq $(RUNS)

# Every curvature at its defaults on a tiny Hugging Face GPT-2 built from a config
# (bench/gpt2_defaults_results.md; headwater only, one thread).
bench-gpt2: setup
	OMP_NUM_THREADS=1 $(PY) -m bench.gpt2_defaults

# 25k-200k training examples x 100 queries on a 1.1M-parameter MLP: time, peak RSS, disk, the
# planner's prediction and the gradient floor (bench/scale_results.md; headwater only, ~15 minutes).
bench-scale: setup
	OMP_NUM_THREADS=1 $(PY) -m bench.scale_sizes

lint: setup
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples

clean:
	rm -rf $(VENV) .venv-bench build *.egg-info src/*.egg-info .pytest_cache
