"""The performance benchmarks run on the CPU shapes and print what they promise (their figures are for
the README; here only their invariants count)."""

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.test_belle import BELLE


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_ppo_iteration_prints_every_phase_for_both_paths():
    out = run("benchmarks/ppo_iteration.py", "--prompts", "8", "--epochs", "2")
    for phase in ("generate", "score", "reward", "update", "optimizer step", "total"):
        row = re.search(rf"^\| {phase} \|(.*)\|$", out, re.M)
        assert row, phase
        cells = [c.strip() for c in row.group(1).split("|")]
        assert len(cells) == 5 and all(float(c) > 0 for c in cells[:4]), (phase, cells)
    assert re.search(r"^new: decode [\d,]+ tokens/s", out, re.M) and re.search(r"^old: decode", out, re.M)


@pytest.mark.skipif(not (BELLE / "eval_set.json").is_file(), reason=f"the BELLE eval files are not at {BELLE}")
def test_generate_benchmark_answers_as_one_at_a_time_greedy_decoding():
    out = run("benchmarks/generate.py", "--questions", "24", "--single", "4", "--batch", "8",
              "--max-new-tokens", "8", "--belle", str(BELLE))
    rows = dict(re.findall(r"^\| (one-at-a-time generate|batched generate|engine) \|(.*)\|$", out, re.M))
    assert rows.keys() == {"one-at-a-time generate", "batched generate", "engine"}
    for cells in rows.values():
        assert cells.strip().endswith("100.0%")  # greedy answers do not depend on batching


def test_kernels_benchmark_compares_both_kernels_on_the_same_model():
    out = run("benchmarks/kernels.py", "--repeat", "1", "--length", "48")
    rows = dict(re.findall(r"^\| (transformers|fused) \|(.*)\|$", out, re.M))
    assert rows.keys() == {"transformers", "fused"}
    for cells in rows.values():
        fwd, _, top, error, nan = (c.strip() for c in cells.split("|"))
        assert float(fwd) > 0 and float(top) > 0 and float(error) < 1e-4 and nan == "no"
    assert re.search(r"^fused vs transformers: forward [\d.]+x, top layers [\d.]+x$", out, re.M)
