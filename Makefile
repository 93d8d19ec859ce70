# The two commands a newcomer needs:  make run   (default experiment)   make test   (all tests)
PYTHON ?= python
.PHONY: setup run test test-fast tinyworld tinydit

setup: .cnexp-setup
# constraints.txt: this machine's exact torch build; the package itself declares only ranges.
# --root-user-action: pip's warning about installing as root (CI, containers) is not cnexp's.
.cnexp-setup: pyproject.toml constraints.txt
	$(PYTHON) -m pip install -q --root-user-action=ignore -c constraints.txt -e '.[dev]'
	$(PYTHON) -c "import cnexp, controlnet_aux, diffusers, lightning, hydra"  # a broken install fails here; cnexp first hides controlnet-aux's import warnings
	touch $@

run: setup
	$(PYTHON) run.py $(ARGS)

# test workers (pytest-xdist): a file's tests stay on one worker (its module fixtures are built
# once; tests/test_slurm.py's one cluster); each worker's torch gets cores / workers threads
TEST_WORKERS ?= 2
test: setup
	$(PYTHON) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

test-fast: setup
	$(PYTHON) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile -m "not slow"

tinyworld: setup  # rebuild the shipped tiny base from scratch (~30 min on 2 CPU cores)
	$(PYTHON) -m cnexp.tinyworld.build --out assets/tinyworld

tinydit: setup  # the transformer base (SD3's shape) on assets/tinyworld's VAE and CLIP (~23 min on 2 CPU cores)
	$(PYTHON) -m cnexp.tinyworld.dit --out assets/tinydit
