# The README's commands. Everything installs into .venv; torch goes in first so that the project's
# looser torch range is already satisfied (a bare `torch` requirement would pull a multi-GB CUDA build).
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
# The stamp names the torch build, so that a different TORCH_SPEC installs again.
STAMP := $(VENV)/.installed-$(shell printf '%s' '$(TORCH_SPEC)' | md5sum | cut -c1-12)

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# The main job: the console on the embedded tiny demo, with the whole tiny pipeline running in it (SFT,
# RM, PPO, then the evaluation judged by the tiny reward model: a few minutes on a laptop CPU; detached, it
# goes on if the console quits). Press n to launch more, v for the score table, ? for every key. Again, it
# opens the console on the runs it has (the pipeline starts only where there is no runs.db yet).
demo: setup
	test -d demo/eval || $(BIN)/rlhf demo init demo
	test -e runs.db || $(BIN)/rlhf pipeline configs/tiny.yaml --accelerate-config configs/accelerate/cpu.yaml --detach
	$(BIN)/rlhf console

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs runs.db runs.db-wal runs.db-shm demo
