"""The PPO stage end to end on the tiny demo, with rule rewards (tests/ppo_rewards.py)."""

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from engine.launch import run_foreground
from engine.models import decoder_layers
from engine.ppo.hydra import Hydra
from engine.store import Store
from engine.template import Turn, render_prompt
from engine.train import run_stage
from tests.conftest import REPO, RLHF, TINY
from tests.helpers import assert_disk_estimate, metric, run_row

TOY = ["reward_fn=tests.ppo_rewards:share_of_letter_a", "lr=3e-3", "rollout_batch_size=32", "max_new_tokens=8"]
TRLX_NAMES = [
    "rollout_scores/mean", "rollout_scores/std", "policy/approx_kl", "policy/clipfrac", "policy/kl_per_token",
    "kl_ctl_value", "losses/total_loss", "losses/policy_loss", "losses/value_loss", "values/mean",
    "values/values_error", "values/clipfrac", "returns/mean", "ratio", "padding_percentage", "time/rollout",
    "time/forward", "time/backward", "time/tokens_per_s", "learning_rate",
]


def values(run_id: int, name: str) -> list[float]:
    return [v for _, v in metric(run_id, name)]


def test_reward_rises_and_the_kl_controller_follows_its_target(workdir):
    run_id, status = run_stage("ppo", str(TINY), [*TOY, "steps=24", "target_kl=1.0", "kl_horizon=1000"])
    assert status == "done"
    scores = values(run_id, "rollout_scores/mean")
    assert len(scores) == 24
    assert sum(scores[-4:]) / 4 > 3 * sum(scores[:4]) / 4  # the toy reward climbs clearly
    for name in TRLX_NAMES:
        assert [s for s, _ in metric(run_id, name)] == list(range(1, 25)), name
    from console.metric_meanings import meaning

    with Store(os.environ["RLHF_DB"]) as store:  # the help screen says what each logged curve means
        logged = {row["name"] for row in store.metrics_since(0, run_id)}
    assert [name for name in logged if meaning(name) is None] == []
    # What a tuner reads beside the losses: the update's gradient norm (before clipping) and how much of the
    # returns the value branch predicts (at most 1; the value head learns the toy reward's returns)
    assert all(v > 0 for v in values(run_id, "grad_norm")) and len(values(run_id, "grad_norm")) == 24
    explained = values(run_id, "values/explained_variance")
    assert len(explained) == 24 and max(explained) <= 1.0 and max(explained[-6:]) > min(explained[:3])
    assert values(run_id, "policy/kl_per_token")[0] == 0.0  # step 0: the policy is the reference
    # The toy reward asks for one letter: the policy's answers narrow, its sampled entropy falls.
    entropy = values(run_id, "policy/entropy_per_token")
    assert len(entropy) == 24 and min(entropy) > 0 and sum(entropy[-4:]) < sum(entropy[:4])
    # Adaptive control: the coefficient moves up when the KL is above target and down when below.
    coef = values(run_id, "kl_ctl_value")  # the coefficient each step's rewards paid: step 1's is the initial one
    assert coef[0] == 0.05
    kl = [v * v for v in values(run_id, "policy/sqrt_kl")]
    for before, after, current in zip(coef, coef[1:], kl):
        assert (after > before) == (current > 1.0), (before, after, current)
    with Store(os.environ["RLHF_DB"]) as store:
        samples = store.samples(run_id)
        assert len(samples) == 24 * 4 and {s["step"] for s in samples} == set(range(1, 25))
        assert all(s["prompt"].endswith("\nASSISTANT:") for s in samples)
    final = Path(run_row(run_id)["output_dir"]) / "final"
    AutoModelForCausalLM.from_pretrained(final)  # the policy is a plain Hugging Face folder
    # with the model's tokenizer as it was, not the left padding and truncation PPO's rollouts use
    from transformers import AutoTokenizer

    exported, base = AutoTokenizer.from_pretrained(final), AutoTokenizer.from_pretrained("demo/model")
    assert (exported.padding_side, exported.truncation_side) == (base.padding_side, base.truncation_side) == \
        ("right", "right")
    assert exported.chat_template is not None and exported.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False) == render_prompt([Turn("user", "hi")])
    card = (final.parent / "README.md").read_text(encoding="utf-8")  # the run folder says what it holds
    assert f"run {run_id}: ppo" in card and "the value branch is not in it" in card and "`branches.pt`" in card
    assert f"`rlhf train ppo --resume-run {run_id} --db {Path(os.environ['RLHF_DB']).resolve()}`" in card
    backend = json.loads((final / "tokenizer.json").read_text(encoding="utf-8"))
    assert backend["truncation"] is None and backend["padding"] is None


def test_resume_reproduces_an_uninterrupted_run(workdir):
    """Weights, optimizer, KL coefficient, reward statistics, data position and RNG all come back: the
    resumed run's steps 4-6 are the uninterrupted run's steps 4-6."""
    whole, _ = run_stage("ppo", str(TINY), [*TOY, "steps=6", "save_steps=100"])
    part, _ = run_stage("ppo", str(TINY), [*TOY, "steps=3", "save_steps=100"])
    state = json.loads((Path(run_row(part)["output_dir"]) / "checkpoint-3" / "ppo_state.json").read_text())
    assert state["step"] == 3 and state["data_position"] == 3 * 32
    recorded = Path(run_row(part)["output_dir"]) / "recipe.resolved.yaml"  # in the folder from its start
    assert json.loads(recorded.read_text())["ppo"]["steps"] == 3
    resumed = subprocess.run([*RLHF, "train", "ppo", str(TINY), "--resume-run", str(part), "--allow-change",
                              *sum((["--set", o] for o in [*TOY, "steps=6", "save_steps=100"]), [])],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The change is recorded from the step it applies from (the run's config reads as its latest)
    changes = json.loads(run_row(part)["changes"])
    assert [(c["step"], c["fields"]) for c in changes] == [(3, ["ppo.steps (3 -> 6)"])]
    assert "changed from step 3 on: ppo.steps (3 -> 6)" in resumed.stderr
    assert json.loads(recorded.read_text())["ppo"]["steps"] == 6  # the recipe it ran on, the change applied
    assert [s for s, _ in metric(part, "kl_ctl_value")] == list(range(1, 7))
    assert values(part, "kl_ctl_value")[3] == state["kl"]["value"]  # the saved controller sets step 4's coefficient
    for name in ("rollout_scores/mean", "kl_ctl_value", "losses/total_loss", "values/mean"):
        assert values(part, name) == pytest.approx(values(whole, name), rel=1e-5, abs=1e-7), name


def test_sigterm_saves_full_state_and_stops(workdir):
    proc = subprocess.Popen([*RLHF, "train", "ppo", str(TINY), *sum((["--set", o] for o in [*TOY, "steps=500"]), [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists("runs.db") and _steps(1) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    run = run_row(1)
    assert run["status"] == "stopped" and run["step"] < 500
    stopped_at = run["step"]
    folder = Path(run["output_dir"]) / f"checkpoint-{stopped_at}"
    for name in ("ppo_state.json", "branches.pt", "optimizer.pt", "rank_0.pt", "policy/model.safetensors"):
        assert (folder / name).is_file(), name
    saved_kl = json.loads((folder / "ppo_state.json").read_text())["kl"]["value"]
    # Refused before the claim: fewer steps than trained (it ended "done 134/100"), and a change of what the
    # checkpoint holds (recorded, it failed to load, and so did every later resume, the plain one too).
    other = Path("other-model")  # another model: its config differs (a folder that only moved is the same model)
    shutil.copytree("demo/model", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "n_layer": config["n_layer"] + 1}))
    for change, why in ((f"ppo.steps={stopped_at - 1}", f"has trained {stopped_at} steps; a resume goes on to "
                         "more steps, not back to fewer"),
                        ("ppo.lora.r=4", "ppo.lora on"), ("ppo.value_layers=3", "ppo.value_layers 2 -> 3"),
                        (f"ppo.model={{path: {other.resolve()}}}", f"-> {other.resolve()}: its checkpoints hold")):
        refused = subprocess.run([*RLHF, "train", "ppo", str(TINY), "--resume-run", "1", "--allow-change", "--set",
                                  change], capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and why in refused.stderr, (change, refused.stderr[-2000:])
        assert run_row(1)["status"] == "stopped" and run_row(1)["config"] == run["config"]  # as it was

    resumed = subprocess.run([*RLHF, "train", "ppo", str(TINY), "--resume-run", "1", "--allow-change",
                              *sum((["--set", o] for o in [*TOY, f"steps={stopped_at + 2}"]), [])],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [s for s, _ in metric(1, "kl_ctl_value")] == list(range(1, stopped_at + 3))
    assert values(1, "kl_ctl_value")[stopped_at] == saved_kl  # the saved controller set the next step's coefficient
    assert run_row(1)["status"] == "done"


def test_value_warmup_leaves_the_policy_and_its_optimizer_state_untouched(workdir):
    run_id, _ = run_stage("ppo", str(TINY), [*TOY, "steps=3", "value_warmup_steps=2", "weight_decay=0.1",
                                             "save_steps=2"])
    kl = values(run_id, "policy/kl_per_token")
    assert kl[:3] == [0.0, 0.0, 0.0]  # rollouts of steps 1-3 come from a policy still equal to the reference
    assert values(run_id, "learning_rate") == [0.0, 0.0, 3e-3]  # the policy's rate; the value branch trains
    folder = Path(run_row(run_id)["output_dir"]) / "checkpoint-2"  # the end of the warm-up
    saved = torch.load(folder / "optimizer.pt", weights_only=True)["optimizer"]
    policy_ids, value_ids = (group["params"] for group in saved["param_groups"])
    assert policy_ids and not any(i in saved["state"] for i in policy_ids)  # no AdamW state, no step
    assert value_ids and all(saved["state"][i]["step"] == 2 * 4 * 4 for i in value_ids)  # 2 steps x 4 epochs x 4
    trained = load_file(folder / "policy" / "model.safetensors")
    base = load_file(workdir / "demo" / "model" / "model.safetensors")
    base.setdefault("lm_head.weight", base["transformer.word_embeddings.weight"])  # untied for training
    assert set(trained) <= set(base)
    for name, value in trained.items():
        assert torch.equal(value, base[name]), name


def test_a_bf16_run_stopped_and_resumed_reproduces_the_uninterrupted_weights(workdir):
    """bf16 frozen trunk, float32 trainable parts under bf16 autocast: SIGTERM, resume, and every saved
    tensor (policy, value and reference branches, optimizer state) equals the uninterrupted run's, bit
    for bit; the float32 parts are not rounded through the checkpoint's bf16 reload."""
    bf16 = [*TOY, "model.dtype=bfloat16", "precision=bf16", "save_steps=100"]
    proc = subprocess.Popen([*RLHF, "train", "ppo", str(TINY), *sum((["--set", o] for o in [*bf16, "steps=500"]), [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (os.path.exists("runs.db") and _steps(1) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    stopped_at = run_row(1)["step"]
    total = stopped_at + 2
    resumed = subprocess.run([*RLHF, "train", "ppo", str(TINY), "--resume-run", "1", "--allow-change",
                              *sum((["--set", o] for o in [*bf16, f"steps={total}"]), [])],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # In a process of its own, as the interrupted one: accelerate's precision is fixed once per process.
    uninterrupted = subprocess.run([*RLHF, "train", "ppo", str(TINY), *sum((["--set", o] for o in
                                   [*bf16, f"steps={total}"]), [])], capture_output=True, text=True, timeout=300)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    whole = 2

    a, b = (Path(run_row(r)["output_dir"]) / f"checkpoint-{total}" for r in (1, whole))
    pa, pb = load_file(a / "policy" / "model.safetensors"), load_file(b / "policy" / "model.safetensors")
    assert pa.keys() == pb.keys()
    assert pa["transformer.h.3.mlp.dense_4h_to_h.weight"].dtype == torch.float32  # trainable: float32 masters
    assert pa["transformer.h.0.mlp.dense_4h_to_h.weight"].dtype == torch.bfloat16  # frozen trunk: bf16
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name
    for file in ("branches.pt", "optimizer.pt"):
        flat_a = _tensors(torch.load(a / file, weights_only=True))
        flat_b = _tensors(torch.load(b / file, weights_only=True))
        assert flat_a.keys() == flat_b.keys() and flat_a
        for key in flat_a:
            assert torch.equal(flat_a[key], flat_b[key]), (file, key)
    assert values(1, "losses/total_loss") == values(whole, "losses/total_loss")
    assert_disk_estimate("ppo", [*bf16, f"steps={total}"], b, b.parent / "final")


def _tensors(tree, prefix=""):
    """Every tensor of a nested dict/list, by path."""
    found = {}
    if isinstance(tree, torch.Tensor):
        found[prefix] = tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            found.update(_tensors(value, f"{prefix}/{key}"))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            found.update(_tensors(value, f"{prefix}/{i}"))
    return found


def test_reference_score_baseline(workdir):
    run_id, _ = run_stage("ppo", str(TINY), [*TOY, "steps=2", "score_baseline=reference", "rollout_batch_size=8",
                                             "scale_reward=null"])
    baseline = values(run_id, "rollout_scores/reference_mean")
    raw = values(run_id, "rollout_scores/mean")
    scaled = values(run_id, "rollout_scores/scaled_mean")
    assert len(baseline) == 2 and baseline[0] > 0
    assert scaled == pytest.approx([r - b for r, b in zip(raw, baseline)], abs=1e-6)


def test_lora_mode_trains_exports_and_resumes(workdir):
    lora = [*TOY, "lora={r: 4, alpha: 16}", "lr=1e-2"]
    run_id, status = run_stage("ppo", str(TINY), [*lora, "steps=2"])
    assert status == "done" and values(run_id, "policy/kl_per_token")[0] == 0.0
    assert values(run_id, "policy/kl_per_token")[1] != 0.0  # the adapters moved the policy
    used = values(run_id, "kl_ctl_value")  # the coefficient each step's rewards paid, as trlx logs it
    assert used[0] == 0.05 and used[1] < 0.05  # tiny.yaml's init_kl_coef, then moved by the adaptive controller
    final = Path(run_row(run_id)["output_dir"]) / "final"
    assert not (final / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(final)
    os.environ["RLHF_RUN_ID"] = str(run_id)
    try:
        _, status = run_stage("ppo", str(TINY), [*lora, "steps=3", "resume_from_checkpoint=true"])
    finally:
        del os.environ["RLHF_RUN_ID"]
    assert status == "done" and [s for s, _ in metric(run_id, "kl_ctl_value")] == [1, 2, 3]
    assert_disk_estimate("ppo", [*lora, "steps=3"], final.parent / "checkpoint-3", final)


def test_a_resume_that_changes_the_rate_the_decay_or_the_kl_coefficient_trains_with_them(workdir):
    """`--allow-change --set ppo.lr=...` (a spiking run's usual fix): the optimizer's, the scheduler's and the
    KL controller's saved state carried the old values over the recipe's, while the record said changed."""
    fixed = [*TOY, "target_kl=null", "save_steps=2"]
    run_id, status = run_stage("ppo", str(TINY), [*fixed, "steps=2"])
    assert status == "done" and values(run_id, "learning_rate") == [3e-3, 3e-3]
    assert values(run_id, "kl_ctl_value") == [0.05, 0.05]
    os.environ["RLHF_RUN_ID"] = str(run_id)
    try:
        _, status = run_stage("ppo", str(TINY), [*fixed, "steps=3", "resume_from_checkpoint=true", "lr=1e-4",
                                                 "weight_decay=0.25", "init_kl_coef=0.2"])
    finally:
        del os.environ["RLHF_RUN_ID"]
    assert status == "done"
    assert values(run_id, "learning_rate") == [3e-3, 3e-3, 1e-4] and values(run_id, "kl_ctl_value")[2] == 0.2
    saved = torch.load(Path(run_row(run_id)["output_dir"]) / "checkpoint-3" / "optimizer.pt", weights_only=False)
    assert [(g["lr"], g["initial_lr"], g["weight_decay"]) for g in saved["optimizer"]["param_groups"]] == \
        [(1e-4, 1e-4, 0.25)] * 2


def test_an_answer_cut_at_the_token_limit_pays_the_missing_eos_penalty(workdir):
    """The reward reads a cut answer as if it had ended (a reward model sees it closed by its </s>): the
    penalty is what tells the policy apart from one that learned to stop, and the cut share is logged."""
    run_id, status = run_stage("ppo", str(TINY), [*TOY, "steps=2", "rollout_batch_size=8", "max_new_tokens=3",
                                                  "scale_reward=null", "missing_eos_penalty=0.5"])
    assert status == "done"
    cut = values(run_id, "response_length/cut_share")
    assert len(cut) == 2 and all(0 <= c <= 1 for c in cut) and max(cut) > 0  # 3 tokens: few answers end
    for raw, scaled, share in zip(values(run_id, "rollout_scores/mean"), values(run_id, "rollout_scores/scaled_mean"),
                                  cut):
        assert scaled == pytest.approx(raw - 0.5 * share, abs=1e-6)
    from tests.ppo_rewards import share_of_letter_a

    with Store(os.environ["RLHF_DB"]) as store:  # the samples keep the reward's own score
        rows = store.samples(run_id, step=1)
    assert rows and [r["score"] for r in rows] == pytest.approx(
        share_of_letter_a([r["prompt"] for r in rows], [r["response"] for r in rows]), abs=1e-6)


def test_rewards_from_the_reward_model_stage(workdir):
    rm_run, _ = run_stage("rm", str(TINY), ["train.max_steps=4", "train.eval_ratio=0"])
    rm_path = Path(run_row(rm_run)["output_dir"]) / "final"
    with_rm = [f"reward_model={rm_path}", "reward_fn=null", "init_value_from_rm=true"]
    run_id, status = run_stage("ppo", str(TINY), [*with_rm, "steps=2", "rollout_batch_size=8", "max_new_tokens=6"])
    assert status == "done"
    with Store(os.environ["RLHF_DB"]) as store:
        samples = store.samples(run_id, step=1)
    # The stored score is the reward model's own score of that prompt and response.
    from engine.ppo.rewards import RewardModelScorer
    from engine.template import Turn

    scorer = RewardModelScorer(str(rm_path), torch.device("cpu"))
    question = samples[0]["prompt"].split("USER: ", 1)[1].rsplit("\nASSISTANT:", 1)[0]
    again = scorer([(Turn("user", question),)], [samples[0]["response"]])
    assert again.item() == pytest.approx(samples[0]["score"], abs=1e-4)


def test_divergence_stops_the_run_names_the_metric_and_is_no_success_to_a_script(workdir):
    """`rlhf train ppo … && rlhf eval belle …` must not go on to evaluate a NaN model: a diverged run exits 1,
    in its own terminal and launched, and its record says 1 as well."""
    nan = ["--set", "ppo.reward_fn=tests.ppo_rewards:always_nan", "--set", "ppo.steps=5", "--set",
           "ppo.rollout_batch_size=4", "--set", "ppo.minibatch_size=4", "--set", "ppo.max_new_tokens=4"]
    own = subprocess.run([*RLHF, "train", "ppo", str(TINY), *nan], capture_output=True, text=True, timeout=600)
    assert own.returncode == 1, own.stderr[-2000:]
    assert "run 1 diverged" in own.stdout and "finished" not in own.stdout
    assert "no checkpoint was saved before it" in own.stdout  # it diverged at step 1: none claimed
    launched = subprocess.run([*RLHF, "launch", "ppo", str(TINY), *nan, "--accelerate-config",
                               str(REPO / "configs" / "accelerate" / "cpu.yaml")],
                              capture_output=True, text=True, timeout=600)
    assert launched.returncode == 1, launched.stderr[-2000:]
    for run_id in (1, 2):
        run = run_row(run_id)
        assert (run["status"], run["exit_code"]) == ("diverged", 1)
        assert "rollout_scores/mean" in run["error"] and "at step 1" in run["error"]
        assert run["error"].startswith("the rollouts' scores became nan: the reward_fn tests.ppo_rewards:always_nan "
                                       "gave a score that is not a finite number"), run["error"]


def test_a_reward_fn_that_returns_no_score_per_response_fails_its_run_naming_it():
    """A traceback from the trainer sent the reader to the PPO code; the run's error names the function."""
    from engine.ppo.rewards import FunctionScorer
    from engine.run import RunFailed
    from engine.template import Turn

    prompts = [(Turn("user", "q"),)] * 3
    short = FunctionScorer(lambda p, r: [1.0, 2.0], torch.device("cpu"), "mine:short")
    with pytest.raises(RunFailed, match=r"^reward_fn mine:short returned 2 scores for 3 responses$"):
        short(prompts, ["a", "b", "c"])
    nothing = FunctionScorer(lambda p, r: None, torch.device("cpu"), "mine:nothing")
    with pytest.raises(RunFailed, match=r"^reward_fn mine:nothing returned NoneType where a number per response"):
        nothing(prompts, ["a", "b", "c"])
    fine = FunctionScorer(lambda p, r: [len(x) for x in r], torch.device("cpu"), "mine:fine")
    assert fine(prompts, ["a", "bb", "ccc"]).tolist() == [1.0, 2.0, 3.0]


def test_two_ranks_agree_on_the_weights(workdir):
    run_id, code = run_foreground("ppo", str(TINY), [*TOY, "steps=2", "rollout_batch_size=8"],
                                  str(REPO / "configs" / "accelerate" / "cpu_ddp.yaml"), echo=False)
    assert code == 0
    run = run_row(run_id)
    assert run["status"] == "done" and run["world_size"] == 2
    log = (Path(run["output_dir"]) / "train.log").read_text()
    digests = dict(re.findall(r"rank (\d) trainable weights digest (\w+)", log))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    assert len(values(run_id, "rollout_scores/mean")) == 2  # rank 0 alone writes
    # A line a step in the log (from rank 0 alone), with the numbers runs.db has.
    steps = re.findall(r"step (\d+)/2: score (-?[\d.]+), kl/token", log)
    assert [int(s) for s, _ in steps] == [1, 2]
    assert [float(v) for _, v in steps] == pytest.approx(values(run_id, "rollout_scores/mean"),
                                                         abs=1e-4)

    # Both ranks resume from the full-state checkpoint of step 2 and still agree after two more steps.
    overrides = sum((["--set", o] for o in [*TOY, "steps=4", "rollout_batch_size=8"]), [])
    resumed = subprocess.run([*RLHF, "launch", "ppo", str(TINY), "--accelerate-config",
                              str(REPO / "configs" / "accelerate" / "cpu_ddp.yaml"), "--resume-run", str(run_id),
                              "--allow-change", *overrides], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = run_row(run_id)
    assert run["status"] == "done" and run["exit_code"] == 0 and run["step"] == 4
    assert [s for s, _ in metric(run_id, "kl_ctl_value")] == [1, 2, 3, 4]  # continued, no gap or repeat
    log = (Path(run["output_dir"]) / "train.log").read_text()
    after = re.findall(r"rank (\d) trainable weights digest (\w+)", log)[2:]
    assert {rank for rank, _ in after} == {"0", "1"} and len({digest for _, digest in after}) == 1
    assert all(digest != digests["0"] for _, digest in after)  # they trained, and identically


def test_ranks_split_every_epoch_of_prompts():
    from engine.ppo.trainer import prompt_indices

    count, size, world = 24, 4, 3
    seen = []
    for position in range(0, count, size * world):  # one epoch, three ranks
        per_rank = [prompt_indices(position, rank, world, size, count, seed=5) for rank in range(world)]
        assert all(len(set(a) & set(b)) == 0 for i, a in enumerate(per_rank) for b in per_rank[i + 1 :])
        seen += [i for part in per_rank for i in part]
    assert sorted(seen) == list(range(count))
    assert prompt_indices(count, 0, world, size, count, seed=5) != prompt_indices(0, 0, world, size, count, seed=5)


def test_a_prompt_set_smaller_than_a_rollout_is_said_in_the_log(workdir, caplog):
    run_id, status = run_stage("ppo", str(TINY), [*TOY, "steps=1", "rollout_batch_size=8",
                                                  "ppo.prompts.0.limit=5"])
    assert status == "done"
    log = caplog.text
    assert re.search(r"--set ppo.prompts.0.limit=5 \(\S+tiny.yaml:\d+\): 5 prompts for a rollout of 8 "
                     r"\(ppo.rollout_batch_size 8 x 1 processes\): each rollout answers some prompts more than once",
                     log), log[-2000:]


def test_value_branch_starts_from_the_reward_model(workdir):
    """Initialised from the RM, the value at the last token is the RM's score of the sequence."""
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained("demo/model", num_labels=1, pad_token_id=3).eval()
    policy = AutoModelForCausalLM.from_pretrained("demo/model").eval()
    hydra = Hydra(policy, num_layers_unfrozen=1, value_layers=2)
    hydra.init_value_from(rm)
    ids = torch.randint(4, 500, (2, 7))
    with torch.no_grad():
        out = hydra(ids, torch.ones_like(ids))
        assert torch.allclose(out.values[:, -1], rm(input_ids=ids).logits[:, 0], atol=1e-5)
    assert hydra.trunk_differs_from(rm) == []  # the trunk it sits on is the one the RM's layers saw
    assert hydra.trunk_differs_from(copy.deepcopy(rm).to(torch.bfloat16)) == []  # the same weights, narrower

    # An RM that trained layer 1 too (more layers than value_layers): the copied branch sits on the policy's
    # layer 1, and its value is no longer the RM's score; the trainer says so (ppo.init_value_from_rm)
    with torch.no_grad():
        trained = decoder_layers(rm)[1].mlp.dense_4h_to_h.weight
        trained.add_(0.05 * torch.randn_like(trained))  # (a constant shift would vanish in the next norm)
    hydra.init_value_from(rm)
    assert hydra.trunk_differs_from(rm) == [1]
    with torch.no_grad():
        assert not torch.allclose(hydra(ids, torch.ones_like(ids)).values[:, -1], rm(input_ids=ids).logits[:, 0],
                                  atol=1e-5)
        decoder_layers(rm)[3].mlp.dense_4h_to_h.weight.add_(0.05)  # inside the copied branch: no matter
        assert hydra.trunk_differs_from(rm) == [1]
        rm.get_input_embeddings().weight.add_(0.01)  # trained from another model, or its embeddings trained
    assert hydra.trunk_differs_from(rm) is None


def _steps(run_id: int) -> int:
    try:
        return len(metric(run_id, "kl_ctl_value"))
    except Exception:
        return 0


def test_a_save_that_never_completed_is_neither_resumed_from_nor_left_behind(workdir):
    run_id, _ = run_stage("ppo", str(TINY), [*TOY, "steps=2", "save_steps=1", "rollout_batch_size=8"])
    out = Path(run_row(run_id)["output_dir"])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    # A crash while writing step 3 (no marker yet), and one between the marker and the rename (step 5).
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-3.partial")
    (out / "checkpoint-3.partial" / "ppo_state.json").unlink()
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-5.partial")
    os.environ["RLHF_RUN_ID"] = str(run_id)
    try:
        _, status = run_stage("ppo", str(TINY), [*TOY, "steps=3", "save_steps=1", "rollout_batch_size=8",
                                                 "resume_from_checkpoint=true"])
    finally:
        del os.environ["RLHF_RUN_ID"]
    assert status == "done"
    assert [s for s, _ in metric(run_id, "kl_ctl_value")] == [1, 2, 3]  # from step 2, not from a partial save
    names = sorted(p.name for p in out.glob("checkpoint-*"))
    assert names == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert json.loads((out / "checkpoint-3" / "ppo_state.json").read_text())["step"] == 3


@pytest.mark.parametrize("kept_by", ["on", "score"])
def test_the_trunk_cached_update_equals_the_uncached_one(workdir, monkeypatch, kept_by):
    """Two PPO steps of 4 epochs with the trunk kept (by the decoder as it samples, the default, or by the
    scoring forward) and with the trunk recomputed in every forward (RLHF_TRUNK_CACHE=off): the same losses,
    to 1e-6, and the same weights."""
    runs = {}
    for mode in (kept_by, "off"):
        monkeypatch.setenv("RLHF_TRUNK_CACHE", mode)
        run_id, _ = run_stage("ppo", str(TINY), [*TOY, "steps=2", "save_steps=100"])
        runs[mode] = run_id
    for name in ("losses/policy_loss", "losses/value_loss", "policy/approx_kl", "policy/kl_per_token"):
        kept, off = values(runs[kept_by], name), values(runs["off"], name)
        assert kept == pytest.approx(off, abs=1e-6), name
    kept, off = (load_file(Path(run_row(r)["output_dir"]) / "final" / "model.safetensors") for r in runs.values())
    assert kept.keys() == off.keys()
    moved = 0
    base = load_file(workdir / "demo" / "model" / "model.safetensors")
    # The decoder computes the trunk in another order (a KV cache, its own attention): float32 rounding apart,
    # which AdamW's normalised step turns into up to ~3e-6 on the head's rows of tokens the rollouts never
    # sampled (gradients near zero); the scoring forward's trunk is the very tensors, hence 1e-6.
    atol = 1e-5 if kept_by == "on" else 1e-6
    for name in kept:
        assert torch.allclose(kept[name], off[name], atol=atol), name
        moved += name in base and not torch.equal(kept[name], base[name])
    assert moved > 0


def test_the_path_switches_take_their_words_and_refuse_others_before_a_run_is_registered(workdir, monkeypatch):
    from engine.config import RecipeError
    from engine.knobs import decode_path, trunk_cache_mode

    monkeypatch.delenv("RLHF_TRUNK_CACHE", raising=False)
    monkeypatch.delenv("RLHF_DECODE", raising=False)
    assert (trunk_cache_mode(), decode_path()) == ("on", "")
    monkeypatch.setenv("RLHF_TRUNK_CACHE", " Score ")
    monkeypatch.setenv("RLHF_DECODE", "Eager")
    assert (trunk_cache_mode(), decode_path()) == ("score", "eager")
    monkeypatch.setenv("RLHF_TRUNK_CACHE", "false")  # "off" was meant: never taken for on
    with pytest.raises(RecipeError, match="RLHF_TRUNK_CACHE='false': not one of on, score, off"):
        trunk_cache_mode()
    for name, value in (("RLHF_TRUNK_CACHE", "bogus"), ("RLHF_DECODE", "fast")):  # a failed run, or ignored
        env = {**os.environ, "RLHF_TRUNK_CACHE": "on", "RLHF_DECODE": "", name: value}
        result = subprocess.run([*RLHF, "train", "ppo", str(TINY)], capture_output=True, text=True, timeout=120,
                                env=env)
        assert result.returncode == 2 and f"error: {name}={value!r}: not one of" in result.stderr, result.stderr
    assert not Path(os.environ["RLHF_DB"]).exists()


def test_a_stop_that_comes_with_the_last_step_lets_ppo_finish(workdir, monkeypatch):
    """As the SFT and RM stages: stopped on its last step, PPO had a checkpoint and no export, and nothing
    left to resume. A stop asked at every step: the last one exports and ends done; an earlier one stops."""
    from engine.ppo import trainer

    class AlwaysAsked:
        requested = True

        def agreed(self) -> bool:
            return True

    monkeypatch.setattr(trainer, "StopFlag", AlwaysAsked)
    small = ["rollout_batch_size=4", "minibatch_size=4", "max_new_tokens=4"]
    run_id, status = run_stage("ppo", str(TINY), [*small, "steps=1"])
    assert status == "done" and (Path(run_row(run_id)["output_dir"]) / "final").is_dir()
    run_id, status = run_stage("ppo", str(TINY), [*small, "steps=2"])
    assert status == "stopped" and run_row(run_id)["step"] == 1
