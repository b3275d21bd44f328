# The two commands: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv/ when missing and reuses it when present.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.fastland-installed
TORCH  := torch==2.14.1 torchvision==0.29.1
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/*.h csrc/cpu/*.h)
PYTEST_ARGS ?=

.PHONY: demo test test-all bench install data clean help sdist-check aot

help:
	@echo "make demo      train/evaluate/plot the Fashion-MNIST demo (runs/demo/report.md)"
	@echo "make test      run the test suite (not the slow end-to-end runs, not the AOT compiles)"
	@echo "make aot       compile the Triton kernels ahead of time for sm_80/sm_90 and check them (tools/)"
	@echo "make test-all  run every test, the slow ones included"
	@echo "make bench     run the benchmarks and regenerate benchmarks/README.md"
	@echo "make sdist-check  build the sdist, then a wheel from it alone, install and smoke-test it"

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q "setuptools>=64" wheel
	$(PIP) install $(TORCH)

$(STAMP): $(PY) $(SOURCES)
	$(PIP) install -q -e '.[dev]' --no-build-isolation
	# torchattacks is the tests' oracle for the strong attacks; its pins (old torch/scipy) conflict, so no deps
	$(PIP) install -q --no-deps torchattacks scipy
	@touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST from Debian's package when we are root and it is missing.
data:
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's dataset-fashion-mnist ..."; \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) || \
	  echo "could not install dataset-fashion-mnist; pass --data-dir to a folder with the IDX .gz files"; \
	else \
	  echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' or pass --data-dir"; \
	fi

demo: $(STAMP) data
	$(PY) -m fastland demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not aot" $(PYTEST_ARGS)

# Ahead-of-time Triton compiles for real GPUs, no GPU needed (tools/triton_aot.py, ~1-2 min cold).
aot: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "aot and not slow" tests/test_aot.py $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	@mkdir -p benchmarks/results
	@for f in benchmarks/bench_*.py; do t=$$(basename $$f .py); t=$${t#bench_}; \
	  echo "== $$t"; \
	  $(PY) -m pytest $$f -q --benchmark-only --benchmark-timer=time.process_time \
	    --benchmark-json=benchmarks/results/$$t.json $(PYTEST_ARGS) || exit 1; done
	$(PY) benchmarks/make_table.py benchmarks/results/*.json benchmarks/README.md

# The sdist holds all the build needs: its file list, then a wheel built from it alone (docs/install.md).
sdist-check: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/test_packaging.py $(PYTEST_ARGS)

clean:
	rm -rf build *.egg-info fastland/_C*.so
