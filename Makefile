# The README's commands. Everything installs into .venv; torch goes in first so that the project's
# looser torch range is already satisfied (a bare `torch` requirement would pull a multi-GB CUDA build).
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# The main job: build the embedded tiny demo, then run the tiny SFT and reward-model recipes.
demo: setup
	$(BIN)/rlhf demo init demo
	$(BIN)/rlhf train sft configs/tiny.yaml
	$(BIN)/rlhf train rm configs/tiny.yaml
	$(BIN)/rlhf runs

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs runs.db runs.db-wal runs.db-shm demo
