# The two commands of the README:  `make bench` (the main job)  and  `make test` (the test suite).
# Both set the machine up first (scripts/setup.sh: once, and again when the package metadata changes
# or Debian's Fashion-MNIST is missing).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastdd-setup
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup bench test clean

$(STAMP): pyproject.toml setup.py scripts/setup.sh
	bash scripts/setup.sh

setup: $(STAMP)
	@test -f $(FMNIST) || bash scripts/setup.sh

bench: setup
	PYTHONUNBUFFERED=1 $(PY) benchmarks/run.py $(ARGS)

test: setup
	$(PY) -m pytest -q -ra $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
