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

# The README's method table is rendered from the method registry first, so a new method appears in it.
bench: setup
	$(PY) scripts/readme_methods.py
	PYTHONUNBUFFERED=1 $(PY) benchmarks/run.py $(ARGS)

# The test suite is two pytest processes (tests/conftest.py): the normal one (-m "not interpreter":
# references, validation, the sm_90 kernel builds, on a GPU the compiled kernels) and the Triton
# interpreter one (-m interpreter, with TRITON_INTERPRET=1 in the environment before anything imports
# Triton: the kernels on CPU tensors). Both always run; the target fails when either fails, or when one
# collects no test at all (pytest's exit code 5), unless ARGS narrowed the selection.
PYTEST        := $(PY) -m pytest -q -ra
EMPTY_PART_OK := $(if $(strip $(ARGS)),yes,)

test: setup
	@passed() { [ "$$1" -eq 0 ] || { [ "$$1" -eq 5 ] && [ -n "$(EMPTY_PART_OK)" ]; }; }; \
	echo '>>> tests 1/2: the normal process (-m "not interpreter")'; \
	env -u TRITON_INTERPRET $(PYTEST) -m "not interpreter" $(ARGS); normal=$$?; \
	echo '>>> tests 2/2: the Triton interpreter process (TRITON_INTERPRET=1, -m interpreter)'; \
	TRITON_INTERPRET=1 $(PYTEST) -m interpreter $(ARGS); interpreter=$$?; \
	echo ">>> exit codes: normal process $$normal, interpreter process $$interpreter"; \
	passed $$normal && passed $$interpreter

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
