# Two commands on a fresh machine: `make lab` and `make test`. Each target
# only calls scripts/setup.sh, the CLI or pytest.
KERNELS ?= before after
# Inside an activated conda environment other than base (environment.yml),
# its python and devdax-lab; else the .venv that setup.sh makes.
ifneq ($(and $(CONDA_PREFIX),$(filter-out base,$(CONDA_DEFAULT_ENV))),)
BIN := $(CONDA_PREFIX)/bin
else
BIN := .venv/bin
endif
DEVDAX := $(BIN)/devdax-lab
PYTEST := $(BIN)/python -m pytest

.PHONY: lab test setup prepare unit live bench doctor

setup:
	@bash scripts/setup.sh

prepare: setup
	$(DEVDAX) prepare $(KERNELS)

# The main job: boot each kernel and print its device-dax namespaces, then
# JupyterLab on 127.0.0.1 with notebooks/00-quickstart open (its URL, token
# included, is printed; Ctrl-C stops it). Under CI (CI set) the server, which
# blocks, is skipped.
lab: prepare
	$(DEVDAX) boot --kernel $(subst $(space),$(comma),$(KERNELS))
	@if [ -z "$$CI" ]; then $(DEVDAX) notebook; else echo "CI is set: not starting JupyterLab"; fi

test: prepare
	$(PYTEST) -q

unit: setup
	$(PYTEST) -q -m "not live"

live: prepare
	$(PYTEST) -q -m live

doctor: setup
	$(DEVDAX) doctor

bench: prepare
	$(DEVDAX) bench boot

empty :=
space := $(empty) $(empty)
comma := ,
