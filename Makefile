# Two entry points for a fresh clone: `make serve` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

# The venv holds PyTorch with its CUDA libraries (~6.2 GiB): say so plainly rather than let pip die half-way
# with "No space left on device".
NEED_GIB ?= 7

$(STAMP): pyproject.toml
	@$(PYTHON) -c "import shutil, sys; free = shutil.disk_usage('.').free / 2**30; \
	sys.exit(0 if free >= $(NEED_GIB) else f'make: only {free:.1f} GiB free here; the .venv needs about $(NEED_GIB) GiB \
	(PyTorch with its CUDA libraries). Free some space, or set NEED_GIB=0 to try anyway.')"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

.PHONY: install serve test lint
install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/visage serve

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest
