import json
import os
import pkgutil
import re
import shlex
import subprocess
import sys

import yaml

from tests.conftest import REPO, RLHF, TINY
from tests.helpers import read_only, run_row


def rlhf(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*RLHF, *args], capture_output=True, text=True, timeout=timeout)


def test_bad_recipe_fails_fast_naming_the_field(workdir):
    bad = workdir / "bad.yaml"
    text = TINY.read_text()
    bad.write_text(text.replace("    lr: 3.0e-3", "    lr: -1"))
    line = text.splitlines().index("    lr: 3.0e-3") + 1
    result = rlhf("train", "sft", str(bad))
    assert result.returncode == 2
    assert f"{bad}:{line}: sft.train.lr: Input should be greater than 0" in result.stderr
    assert not (workdir / "runs.db").exists()  # nothing was registered or started
    result = rlhf("launch", "rm", str(TINY), "--accelerate-config", str(REPO / "configs/accelerate/cpu.yaml"),
                  "--set", "rm.data.0.path=demo/data/missing.jsonl")
    assert result.returncode == 2
    assert "--set rm.data.0.path=demo/data/missing.jsonl: rm.data.0.path: 'demo/data/missing.jsonl' does not exist" \
        in result.stderr
    assert not (workdir / "runs.db").exists()


def test_validation_and_registration_do_not_load_torch(workdir):
    """What the console calls to check and start a run must stay light."""
    code = (
        "import sys\nfrom engine.launch import prepare\nfrom engine.train import validate\n"
        "from engine.config import RecipeError\n"
        f"try:\n    validate('sft', {str(TINY)!r}, ['sft.train.epochs=0'])\nexcept RecipeError as e:\n    print(e)\n"
        f"run = prepare('rm', {str(TINY)!r}, [], {str(REPO / 'configs/accelerate/cpu.yaml')!r})\n"
        "print('registered', run.run_id)\n"
        "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "sft.train.epochs" in out and "registered 1" in out and "torch not loaded" in out


def test_check_prints_the_resolved_recipe(workdir):
    result = rlhf("check", str(TINY), "--stage", "rm", "--set", "train.lr=0.5")
    assert result.returncode == 0
    assert json.loads(result.stdout)["rm"]["train"]["lr"] == 0.5


def test_missing_data_is_reported_without_a_traceback(workdir):
    empty = workdir / "empty.jsonl"
    empty.write_text('{"instruction": "only"}\n')
    result = rlhf("train", "sft", str(TINY), "--set", f"sft.data=[{{path: {empty}}}]")
    assert result.returncode == 2
    assert f"sft.data.0: {empty}: no usable SFT record; first problem: {empty}:1: missing 'output'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (workdir / "runs.db").exists()  # found in validation: nothing registered


def test_data_that_cannot_train_is_exit_2_before_anything_is_registered(workdir):
    """Empty file, `[]`, a .csv, a file in another stage's format (one error, not a warning a row), a
    max_length below most prompts, a malformed row under --strict-data: exit 2 from validation, under
    `rlhf launch` as under `train`, with the field and the file (and line) named."""
    (workdir / "empty.jsonl").write_text("")
    (workdir / "array.json").write_text("[]\n")
    (workdir / "table.csv").write_text("instruction,output\nq,a\n")
    bad_row = workdir / "pairs.jsonl"
    bad_row.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
                       '{"prompt": "你好", "chosen": "a" "rejected": "b"}\n')  # column 32 in characters, 36 in bytes
    accel = str(REPO / "configs/accelerate/cpu.yaml")
    cases = [
        (["sft", "--set", "sft.data=[{path: empty.jsonl}]"],
         "sft.data.0: empty.jsonl: no usable SFT record (the source is empty)"),
        (["sft", "--set", "sft.data=[{path: array.json}]"], "sft.data.0: array.json: no usable SFT record"),
        (["sft", "--set", "sft.data=[{path: table.csv}]"], "sft.data.0: table.csv: unsupported file type '.csv'"),
        (["sft", "--set", "sft.data=[{path: demo/data/preferences.jsonl}]"],
         "sft.data.0: demo/data/preferences.jsonl: none of its first 20 records is an SFT record"),
        (["sft", "--set", "sft.train.max_length=30"],
         "--set sft.train.max_length=30: sft.train.max_length=30 drops 116 of 116 conversations"),
        (["rm", "--strict-data", "--set", "rm.data=[{path: pairs.jsonl}]"],
         "rm.data.0: pairs.jsonl:2: not valid JSON (Expecting ',' delimiter, column 32) (strict data"),
        # A folder (read through `datasets`) is checked as a file is.
        (["sft", "--set", "sft.data=[{path: folder}]"], "sft.data.0: folder: none of its first 20 records is an SFT"),
        (["ppo", "--set", "ppo.reward_fn=nosuch.module:score"],
         "ppo.reward_fn: reward_fn 'nosuch.module:score': ModuleNotFoundError: No module named 'nosuch'"),
        (["ppo", "--set", "ppo.reward_fn=engine.demo.nosuch:score"],
         "ppo.reward_fn: reward_fn 'engine.demo.nosuch:score': no module named 'engine.demo.nosuch'"),
        # read from the module's source, not imported: the console validates in its own process
        (["ppo", "--set", "ppo.reward_fn=engine.demo.rewards:nope"], "reward_fn 'engine.demo.rewards:nope': "
                                                                      "engine.demo.rewards ("),
        (["ppo", "--set", "ppo.reward_fn=engine.demo.rewards"], "ppo.reward_fn: reward_fn 'engine.demo.rewards': "
                                                                 "expected module:function"),
        (["ppo", "--set", "ppo.model.path=scorer"], "ppo.model.path: 'scorer' does not write answers (it is a "
                                                    "BloomForSequenceClassification"),
        (["sft", "--set", "sft.train.max_steps=0"], "sft.train.max_steps: 0 would train nothing"),
        # epochs asked for where steps decide the length: the run would train as long as without them
        (["sft", "--set", "train.max_steps=20", "--set", "train.epochs=3"],
         "--set train.epochs=3: sft.train.epochs counts for nothing while sft.train.max_steps is 20"),
    ]
    (workdir / "folder").mkdir()
    (workdir / "folder" / "train.jsonl").write_text('{"question": "q", "answer": "a"}\n' * 30)
    (workdir / "scorer").mkdir()  # an RM export as the policy: a trunk under a fresh LM head
    (workdir / "scorer" / "config.json").write_text('{"architectures": ["BloomForSequenceClassification"]}')
    (workdir / "scorer" / "model.safetensors").write_bytes(b"")
    for args, message in cases:
        stage, *rest = args
        result = rlhf("launch", stage, str(TINY), "--accelerate-config", accel, *rest)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr[-1500:])
        assert result.stderr.count("malformed record skipped") == 0 and "Traceback" not in result.stderr
    assert not (workdir / "runs.db").exists()
    # rlhf check says the same, --strict-data and the accelerate config's launch checks included
    checked = rlhf("check", str(TINY), "--stage", "rm", "--strict-data", "--set", "rm.data=[{path: pairs.jsonl}]")
    assert checked.returncode == 2 and "pairs.jsonl:2: not valid JSON (Expecting ',' delimiter" in checked.stderr
    checked = rlhf("check", str(TINY), "--stage", "sft", "--accelerate-config", accel)
    assert checked.returncode == 0, checked.stderr[-1500:]
    assert f"ok: sft can launch as {accel} starts it" in checked.stderr  # said, not left to be inferred
    checked = rlhf("check", str(TINY), "--accelerate-config", str(REPO / "configs/accelerate/zero3.yaml"))
    assert checked.returncode == 2 and "zero3.yaml" in checked.stderr, checked.stderr[-1500:]
    result = rlhf("train", "rm", str(TINY), "--set", "rm.data=[{path: pairs.jsonl}]", "--set", "train.max_steps=1",
                  "--set", "train.eval_ratio=0", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pairs.jsonl:2: not valid JSON" in result.stderr  # not strict: skipped with a warning


def test_what_max_prompt_length_cuts_is_said_once(workdir):
    result = rlhf("train", "ppo", str(TINY), "--set", "ppo.max_prompt_length=8", "--set", "ppo.steps=1", "--set",
                  "ppo.rollout_batch_size=4", "--set", "ppo.minibatch_size=4", "--set", "ppo.max_new_tokens=4",
                  timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"ppo.max_prompt_length=8: (\d+) of \1 prompts are longer \(the longest \d+ tokens\) and "
                     r"keep their last 8 tokens", result.stderr), result.stderr[-2000:]


def test_what_max_length_does_is_reported_per_source_in_the_log_and_runs_db(workdir):
    result = rlhf("train", "sft", str(TINY), "--set", "train.max_length=40", "--set", "train.max_steps=1",
                  timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    fates = json.loads(run_row(1)["data_fates"])
    assert set(fates) == {s["path"] for s in yaml.safe_load(TINY.read_text())["sft"]["data"]}
    assert all(f["truncated"] > 0 and f["dropped"] > 0 for f in fates.values())
    for path, f in fates.items():
        line = f"{path}: {f['truncated'] + f['dropped']} conversations longer than sft.train.max_length=40: " \
               f"{f['truncated']} truncated, {f['dropped']} dropped ({f['kept']} kept whole)"
        assert line in result.stderr


def test_accelerate_configs_load_with_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    names = {p.name for p in (REPO / "configs" / "accelerate").glob("*.yaml")}
    assert {"cpu.yaml", "cpu_ddp.yaml", "gpu.yaml", "ddp.yaml", "zero2.yaml", "zero3.yaml", "multinode.yaml"} <= names
    for name in names:
        config = load_config_from_file(str(REPO / "configs" / "accelerate" / name))
        assert config.distributed_type is not None, name
    zero3 = yaml.safe_load((REPO / "configs/accelerate/zero3.yaml").read_text())
    assert zero3["deepspeed_config"]["zero_stage"] == 3 and zero3["mixed_precision"] == "bf16"


def test_import_hygiene():
    """engine never imports Textual; console never imports torch or transformers."""
    engine_modules = [m.name for m in pkgutil.walk_packages([str(REPO / "engine")], "engine.")]
    code = (
        "import importlib, sys\n"
        f"for name in {engine_modules!r}:\n    importlib.import_module(name)\n"
        "assert not any(m == 'textual' or m.startswith('textual.') for m in sys.modules), 'engine imported textual'\n"
        "import console\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    console_modules = [m.name for m in pkgutil.walk_packages([str(REPO / "console")], "console.")]
    code = (
        "import importlib, sys\nimport console\n"
        f"for name in {console_modules!r}:\n    importlib.import_module(name)\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'accelerate', 'datasets', 'peft', 'pandas')\n"
        "         if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    # runs.db without the pandas and numpy that sqlite_utils would import (half of `rlhf runs`' time), and
    # both still importable for whoever needs them.
    code = ("import sys\nimport engine.store\nassert 'pandas' not in sys.modules and 'numpy' not in sys.modules\n"
            "import pandas, numpy, datasets\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    # Not while another thread runs (the console imports the store in a worker while its chart imports numpy):
    # what this import hides, every thread would see missing.
    code = ("import sys, threading\nheld = threading.Event()\nthreading.Thread(target=held.wait).start()\n"
            "import engine.store\nheld.set()\nassert 'numpy' in sys.modules and sys.modules['numpy'] is not None\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_demo_loads_through_the_auto_classes(demo_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_dir / "model")
    model = AutoModelForCausalLM.from_pretrained(demo_dir / "model")
    assert model.config.model_type == "bloom" and model.config.n_layer == 4 and model.config.hidden_size == 64
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("</s>", "<pad>", "<s>")
    assert len({tok.eos_token_id, tok.pad_token_id, tok.bos_token_id, tok.unk_token_id}) == 4
    text = "Translate the word into Chinese. 苹果 </s>"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: lossless on both languages
    assert model.get_input_embeddings().num_embeddings == len(tok)
    for name in ("sft_alpaca.jsonl", "sft_sharegpt.json", "sft_messages.jsonl", "preferences.jsonl",
                 "preferences_hh.jsonl", "prompts.jsonl"):
        assert (demo_dir / "data" / name).stat().st_size > 0


def test_check_finds_a_missing_data_file_before_anything_runs(workdir):
    missing = workdir / "nowhere.jsonl"
    result = rlhf("check", str(TINY), "--stage", "sft", "--set", f"sft.data=[{{path: {missing}}}]")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "sft.data.0.path" in result.stderr and "does not exist" in result.stderr
    every_stage = rlhf("check", str(TINY), "--set", f"rm.data=[{{path: {missing}}}]")  # no --stage: each stage
    assert every_stage.returncode == 2 and "rm.data.0.path" in every_stage.stderr
    whole = rlhf("check", str(TINY))
    assert whole.returncode == 0
    # A pipeline scores PPO with its RM export: the recipe's rule reward is for PPO alone, and the user is told
    # (the PPO run's overrides alone said `ppo.reward_fn=null`).
    assert whole.stderr.strip() == ("note: ppo.reward_fn engine.demo.rewards:correct_answer is the reward of a PPO "
                                    "run alone: in this pipeline PPO scores with its rm stage's export (`rlhf train "
                                    "ppo` runs PPO with the function)")
    assert rlhf("check", str(TINY), "--stage", "ppo").stderr == ""
    # Each stage's problem is said, the evaluation's too: one run of check, not one per fix.
    every_problem = rlhf("check", str(TINY), "--set", f"sft.data=[{{path: {missing}}}]", "--set",
                         f"ppo.prompts=[{{path: {missing}}}]", "--set", "eval.eval_dir=/no/belle")
    assert every_problem.returncode == 2 and every_problem.stdout == ""
    lines = every_problem.stderr.strip().splitlines()
    assert [line.split(":")[:2] for line in lines] == [["error", " sft"], ["error", " ppo"], ["error", " eval"]]
    assert "sft.data.0.path" in lines[0] and "ppo.prompts.0.path" in lines[1] and "eval.eval_dir: /no/belle" in lines[2]
    # The pipeline's evaluation alone (--set keys relative to it), as the pipeline checks it
    assert rlhf("check", str(TINY), "--stage", "eval").returncode == 0
    evaluation = rlhf("check", str(TINY), "--stage", "eval", "--set", "eval_dir=/no/belle")
    assert evaluation.returncode == 2 and evaluation.stderr.startswith("error: --set eval_dir=/no/belle: eval.eval_dir")
    without_rm = rlhf("check", str(TINY), "--stage", "eval", "--set", "rm=null", "--set", "ppo.reward_fn=x:y")
    assert without_rm.returncode == 2 and "eval.judge: rm judges with this pipeline's reward model" in without_rm.stderr


def test_a_yaml_mapping_key_glued_to_its_value_is_explained():
    result = rlhf("check", str(TINY), "--set", "sft.data=[{path:demo/data/sft_alpaca.jsonl}]")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --set 'sft.data=[{path:demo/data/sft_alpaca.jsonl}]': "
                                     "'path:demo/data/sft_alpaca.jsonl' reads as one key with no value: in YAML's "
                                     "{...} a key needs a space after its colon (path: demo/data/sft_alpaca.jsonl)")


def test_a_missing_local_looking_model_is_a_one_line_error_before_anything(workdir):
    """`demo/nomodel` sits beside `demo/`: a local path that does not exist, not a hub id to retry for a minute.
    A name that can only be a hub id is asked of the hub once: without a network, one line says so."""
    accel = str(REPO / "configs/accelerate/cpu.yaml")
    result = rlhf("launch", "sft", str(TINY), "--accelerate-config", accel, "--set", "model.path=demo/nomodel")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("error: --set model.path=demo/nomodel: model.path: 'demo/nomodel' does not exist")
    result = subprocess.run([*RLHF, "launch", "sft", str(TINY), "--accelerate-config", accel,
                             "--set", "model.path=nobody-has-this-model"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "not in the Hugging Face cache" in result.stderr
    # Where it looked: a recipe copied elsewhere keeps paths relative to where it was first run.
    assert f"is no folder under {workdir} (recipe paths are relative to the current directory)" in result.stderr
    assert not (workdir / "runs.db").exists()
    # The shipped tiny recipe where no demo was written: what writes it is said
    (workdir / "demo").unlink()
    result = subprocess.run([*RLHF, "check", str(TINY), "--stage", "sft"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "model.path: 'demo/model' is no folder" in result.stderr, result.stderr
    assert result.stderr.strip().endswith("; `rlhf demo init demo` writes the tiny demo's model and data there")


def test_a_hydra_taller_than_the_model_is_refused_before_anything_is_registered(workdir):
    """The tiny model has 4 layers: k_v = 4 leaves no trunk. Said by `rlhf check` and before a launch
    registers anything (it failed once the model had loaded, as a registered run)."""
    accel = str(REPO / "configs/accelerate/cpu.yaml")
    tall = ["--set", "ppo.value_layers=4"]
    result = rlhf("check", str(TINY), "--stage", "ppo", *tall)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == ("error: --set ppo.value_layers=4: ppo.value_layers: 4, but the model "
                                     "'demo/model' has 4 layers (the hydra shares a frozen trunk below its top k "
                                     "and k_v layers: k <= k_v < 4)")
    result = rlhf("launch", "ppo", str(TINY), "--accelerate-config", accel, *tall,
                  "--set", "ppo.num_layers_unfrozen=4")
    assert result.returncode == 2 and "ppo.value_layers: 4, but the model" in result.stderr, result.stderr
    assert not (workdir / "runs.db").exists()
    assert rlhf("check", str(TINY), "--stage", "ppo", "--set", "ppo.value_layers=3").returncode == 0
    # A pipeline's policy is its SFT export (`@sft`), of the SFT stage's model's shape: refused before SFT trains.
    piped = rlhf("check", str(TINY), "--stage", "ppo", "--set", "ppo.model.path=@sft", *tall)
    assert piped.returncode == 2 and "ppo.value_layers: 4, but the model 'demo/model' has 4 layers" in piped.stderr
    # SFT and RM train their top N layers: more than the model has failed the run once it had loaded.
    deep = rlhf("launch", "rm", str(TINY), "--accelerate-config", accel, "--set", "rm.num_layers_unfrozen=10")
    assert deep.returncode == 2 and "rm.num_layers_unfrozen: 10, but the model 'demo/model' has 4 layers (-1 " \
        "trains them all)" in deep.stderr, deep.stderr
    assert rlhf("check", str(TINY), "--stage", "sft", "--set", "sft.num_layers_unfrozen=4").returncode == 0
    assert not (workdir / "runs.db").exists()


def test_a_new_ppo_runs_minibatches_divide_its_rollout_and_a_run_recorded_before_still_resumes(workdir):
    """Each PPO epoch splits a rollout into minibatches: one larger than the rollout trained on it whole
    under a size it never had, a remainder was an optimiser step on a few rows. Refused for a new run; a
    run recorded before the check continues as it was."""
    for sets, where in ((["ppo.rollout_batch_size=12"], "--set ppo.rollout_batch_size=12"),
                        (["ppo.minibatch_size=32"], "--set ppo.minibatch_size=32")):
        refused = rlhf("check", str(TINY), "--stage", "ppo", *sum((["--set", s] for s in sets), []))
        assert refused.returncode == 2 and where in refused.stderr, refused.stderr
        assert "ppo.minibatch_size (" in refused.stderr and "must divide ppo.rollout_batch_size (" in refused.stderr
    from engine.config import load_recipe

    old = ["rollout_batch_size=4", "max_new_tokens=4", "steps=1", "save_steps=1"]  # minibatches of 8, as before
    from engine.train import run_stage

    run_id, status = run_stage("ppo", str(TINY), old, checked=load_recipe(TINY, old, "ppo"))
    assert status == "done"
    resumed = rlhf("train", "ppo", "--resume-run", str(run_id), "--allow-change", "--set", "ppo.steps=2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_a_section_error_caused_by_a_set_item_names_that_item(workdir):
    result = rlhf("check", str(TINY), "--set", "ppo.num_layers_unfrozen=3")
    assert result.returncode == 2
    assert "--set ppo.num_layers_unfrozen=3 (" in result.stderr and "must be >= num_layers_unfrozen" in result.stderr
    result = rlhf("check", str(TINY), "--set", "sft.num_layers_unfrozen=1", "--set", "sft.lora.r=4")
    assert "--set sft.num_layers_unfrozen=1, --set sft.lora.r=4 (" in result.stderr
    result = rlhf("check", str(TINY), "--set", "sft.data.0.path=")
    assert result.returncode == 2 and "sft.data.0.path: String should have at least 1 character" in result.stderr


def test_a_listing_piped_into_head_ends_quietly(workdir):
    from engine.store import Store

    with Store(os.environ["RLHF_DB"]) as store:
        for k in range(1500):  # ~100 KiB of listing, more than a pipe's 64 KiB: the writer meets the closed end
            store.create_run(stage="sft", name=f"run {k}", recipe="", config="{}")
    listed = subprocess.run(" ".join([*map(shlex.quote, RLHF), "runs"]) + " | head -1", shell=True,
                            capture_output=True, text=True, timeout=120, executable="/bin/bash")
    assert listed.stdout.startswith("  id stage") and listed.stderr == ""
    # The resolved recipe that `rlhf check` prints, into a pipe whose reader is gone before it starts (closed
    # here first, not raced against), with stdout buffered as a plain shell has it.
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        # (one stage: the whole recipe's check also notes, on stderr, what a pipeline does with its reward_fn)
        checked = subprocess.run([*RLHF, "check", str(TINY), "--stage", "sft"], stdout=write_end,
                                 stderr=subprocess.PIPE, text=True, timeout=120, env=buffered)
    finally:
        os.close(write_end)
    assert (checked.returncode, checked.stderr) == (141, "")


def test_a_runs_db_that_cannot_be_written_is_one_clear_error(workdir):
    """`rlhf stop` writes the stop down first: on a runs.db this user may only read, one line naming the
    file, exit 2, not sqlite's traceback."""
    from engine.store import Store

    db = workdir / "ro" / "runs.db"
    db.parent.mkdir()
    with Store(db) as store:
        run_id = store.create_run(stage="sft", name="t", recipe="", config="{}", output_root=str(workdir / "runs"))
        store.update_run(run_id, status="running")  # no processes recorded: nothing would be signalled
        ended = subprocess.Popen(["true"])
        ended.wait()
        gone = store.create_run(stage="sft", name="t", recipe="", config="{}", output_root=str(workdir / "runs"))
        store.update_run(gone, status="running", pid=ended.pid)  # its process ended: a look closes its row
    with read_only(db):
        result = subprocess.run([*RLHF, "stop", str(run_id), "--db", str(db)], capture_output=True, text=True,
                                timeout=60)
        # A look still lists the runs (it would close the row of a run whose processes are gone: it says it
        # could not); on a full disk it printed one error and nothing else
        listed = subprocess.run([*RLHF, "runs", "--db", str(db)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: {db}: attempt to write a readonly database", result.stderr
    assert listed.returncode == 0 and f"\n{gone:>4} sft" in "\n" + listed.stdout, listed.stdout + listed.stderr
    assert "could not close the rows of ended runs (attempt to write a readonly database)" in listed.stderr


def test_rlhf_chat_refuses_a_spec_that_names_no_model_before_the_console_opens(workdir):
    """`openai:gpt` without @URL, or a mistyped folder: said at the prompt, exit 2 (the console opened on
    two dead panes, one saying a hub repo id must use alphanumeric chars)."""
    from engine.store import Store

    bad_endpoint = rlhf("chat", "demo/model", "openai:gpt")
    assert bad_endpoint.returncode == 2
    assert bad_endpoint.stderr.strip() == ("error: 'openai:gpt': an endpoint is openai:MODEL@BASE_URL, e.g. "
                                           "openai:gpt-4o@https://api.openai.com/v1")
    typo = rlhf("chat", "demo/modle")
    assert typo.returncode == 2 and "'demo/modle': no such folder" in typo.stderr
    empty = rlhf("chat", "demo/model", "")
    assert empty.returncode == 2 and "an empty model" in empty.stderr
    # A run id that runs.db lacks, or a reward model's: as the console's C says (the chat opened, exit 0,
    # and said it in a pane, or loaded the reward model first).
    with Store(os.environ["RLHF_DB"]) as store:
        sft = store.create_run(stage="sft", name="tiny", recipe="", config="{}")
        rm = store.create_run(stage="rm", name="tiny", recipe="", config="{}")
    missing = rlhf("chat", str(sft), "99")
    assert missing.returncode == 2 and missing.stderr.strip() == "error: no run 99 in this runs.db"
    scorer = rlhf("chat", str(rm))
    assert scorer.returncode == 2 and f"run {rm} is a reward model: it scores answers" in scorer.stderr


def test_a_source_listed_twice_is_refused_for_a_new_run_and_not_for_a_resume(workdir):
    """The same file twice trains its records twice (the launch form's data field set to a source the recipe
    lists already, say): refused before anything is registered, naming both; a file has no splits, so a
    split asked of it is refused (`split: test` meant to hold out records it would train on). A resume
    continues a run as recorded, whatever it listed."""
    from engine.train import validate

    twice = rlhf("check", str(TINY), "--stage", "sft", "--set", "sft.data.0.path=./demo/data/sft_messages.jsonl")
    assert twice.returncode == 2
    assert ("sft.data.2.path: demo/data/sft_messages.jsonl is sft.data.0's source too: its records would train "
            "twice; to count a source more, give it a weight") in twice.stderr, twice.stderr
    prompts = "    - {path: demo/data/prompts.jsonl}\n"
    recipe = workdir / "split.yaml"
    other_split = prompts + "    - {path: demo/data/prompts.jsonl, split: test}\n"
    recipe.write_text(TINY.read_text().replace(prompts, other_split))
    split = rlhf("check", str(recipe), "--stage", "ppo")
    assert split.returncode == 2
    assert (f"{recipe}:45: ppo.prompts.1.split: demo/data/prompts.jsonl is a file, read whole: a file has no "
            "splits") in split.stderr, split.stderr
    assert not (workdir / "runs.db").exists()
    resumed = validate("ppo", str(recipe), ["ppo.resume_from_checkpoint=true"])
    assert len(resumed.ppo.prompts) == 2


def test_a_command_about_a_run_in_a_folder_without_runs_db_says_so_and_makes_none(workdir, tmp_path):
    """From the wrong folder, a resume, a stop, a chat or an evaluation's resume made an empty runs.db there
    (which every later command in that folder then read) and said only "no run 6"."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ}
    env.pop("RLHF_DB", None)
    commands = [["train", "sft", "--resume-run", "6"], ["stop", "6"], ["eval", "belle", "--resume-run", "6"],
                ["pipeline", "--resume", "1"], ["eval", "table"], ["runs"], ["chat", "6"]]
    for command in commands:
        result = subprocess.run([*RLHF, *command], cwd=elsewhere, env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2, (command, result.stderr)
        assert "runs.db: no runs database here (run from the folder that has runs.db, or give --db or set RLHF_DB)" \
            in result.stderr, (command, result.stderr)
        assert not (elsewhere / "runs.db").exists(), command


def test_an_evaluation_resume_of_a_training_run_says_it_is_no_evaluation(workdir):
    """A done PPO run given to `rlhf eval belle --resume-run` was told to use --answers-from, which then
    refused it as no evaluation."""
    from engine.store import Store

    with Store(workdir / "runs.db") as store:
        run_id = store.create_run(stage="ppo", name="t", recipe="", config="{}", output_root=str(workdir / "runs"))
        store.update_run(run_id, status="done")
    result = rlhf("eval", "belle", "--resume-run", str(run_id))
    assert result.returncode == 2 and f"run {run_id} is a PPO run, not an evaluation" in result.stderr, result.stderr
    assert "--answers-from" not in result.stderr


def test_delete_forgets_ended_runs_and_their_folders_checking_every_run_first(workdir):
    from engine.procs import process_start
    from engine.store import Store

    with Store(workdir / "runs.db") as store, Store(workdir / "other.db") as other:
        def made(stage: str, status: str = "done", **fields) -> int:
            run_id = store.create_run(stage=stage, name=stage, recipe="", config="{}")
            store.update_run(run_id, status=status, **fields)
            (workdir / "runs" / str(run_id) / "final").mkdir(parents=True)
            return run_id

        sft = made("sft")
        ppo = made("ppo", config=json.dumps({"ppo": {"model": {"path": f"{workdir}/runs/{sft}/final"}}}))
        running = made("rm", "running", pid=os.getpid(), pgid_started=process_start(os.getpid()))
        foreign = other.create_run(stage="sft", name="theirs", recipe="", config="{}",
                                   output_root=str(workdir / "elsewhere"))
        copied = made("sft", output_dir=str(workdir / "elsewhere" / str(foreign)))  # a row naming their folder
        pipeline = store.create_pipeline(name="p", recipe="", config="{}", overrides=[], through="ppo", launch={})
        stage = made("sft", pipeline_id=pipeline)
    def ids() -> set[int]:
        with Store(workdir / "runs.db") as store:
            return {run["id"] for run in store.runs()}

    every = ids()

    # Refused, with nothing deleted: a run another run uses (with --files), an active one, an unknown one,
    # a stage of a pipeline still going
    result = rlhf("delete", str(sft), "--files")
    assert result.returncode == 2
    assert f"run {ppo} uses run {sft}'s files (trained from its export" in result.stderr
    assert "add --force" in result.stderr
    result = rlhf("delete", str(sft), str(running))
    assert result.returncode == 2 and f"run {running} is running: stop it before deleting it" in result.stderr
    result = rlhf("delete", str(sft), "999")
    assert result.returncode == 2 and "no run 999" in result.stderr
    result = rlhf("delete", str(stage))
    assert result.returncode == 2 and f"is a stage of pipeline {pipeline}, which is pending" in result.stderr
    assert ids() == every and (workdir / "runs" / str(sft)).is_dir()

    # Both together: the user goes too, so nothing is left without its model
    result = rlhf("delete", str(sft), str(ppo), "--files")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"run {sft} deleted, and its folder {workdir}/runs/{sft}",
                                          f"run {ppo} deleted, and its folder {workdir}/runs/{ppo}"]
    assert ids() == every - {sft, ppo}
    assert not (workdir / "runs" / str(sft)).exists() and not (workdir / "runs" / str(ppo)).exists()

    # A folder without this runs.db's marker for the run is kept, and the exit says the files were not deleted
    result = rlhf("delete", str(copied), "--files")
    assert result.returncode == 1 and "its folder" in result.stderr and "was kept" in result.stderr
    assert copied not in ids() and (workdir / "elsewhere" / str(foreign)).is_dir()
    # A pipeline that reads running with its process gone (killed -9) is closed first, as a look would:
    # neither a stop (nothing to stop) nor a delete would ever clear it otherwise. Without --files the
    # folder stays.
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    started = process_start(dead.pid)
    dead.wait()
    with Store(workdir / "runs.db") as store:
        store.update_pipeline(pipeline, status="running", pid=dead.pid, pid_started=started,
                              host=socket.gethostname())
    result = rlhf("delete", str(stage))
    assert result.returncode == 0, result.stderr
    assert stage not in ids() and (workdir / "runs" / str(stage)).is_dir()
    with Store(workdir / "runs.db") as store:
        assert store.pipeline(pipeline)["status"] == "failed"


def test_the_console_and_chat_without_a_terminal_say_so_and_exit(workdir):
    """Piped or in a script, the console ran on unseen (5 minutes of CPU drawing escape codes into a pipe
    until killed); it says it needs a terminal instead, after what is wrong with its arguments."""
    for command in (["console"], [], ["chat", "demo/model"]):
        result = subprocess.run([*RLHF, *command], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2, (command, result.stderr)
        assert "needs a terminal (its input and output here are not one)" in result.stderr, (command, result.stderr)
        assert "\x1b" not in result.stdout + result.stderr
    typo = subprocess.run([*RLHF, "chat", "demo/modle"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120)
    assert typo.returncode == 2 and "'demo/modle': no such folder" in typo.stderr
