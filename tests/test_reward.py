import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from engine.config import load_recipe
from engine.data import load_preferences
from engine.models import load_reward_trunk, load_tokenizer
from engine.template import Turn, render_prompt, tokenize_pair
from engine.train import run_stage
from tests.conftest import TINY
from tests.helpers import metric, run_row


def test_reward_model_learns_a_separable_preference_and_exports(workdir):
    run_id, _ = run_stage("rm", str(TINY), ["train.max_steps=20", "train.logging_steps=1", "train.eval_steps=10",
                                            "train.save_steps=10"])
    run = run_row(run_id)
    assert run["status"] == "done"
    accuracy = metric(run_id, "eval_accuracy")
    assert [s for s, _ in accuracy] == [10, 20]
    assert accuracy[-1][1] >= 0.8 and metric(run_id, "eval_margin")[-1][1] > 0
    losses = [v for _, v in metric(run_id, "loss")]
    assert sum(losses[-5:]) < sum(losses[:5])
    for name in ("accuracy", "margin", "mean_reward", "learning_rate", "grad_norm"):
        assert len(metric(run_id, name)) == 20, name
    from console.metric_meanings import meaning
    from engine.store import Store

    with Store(os.environ["RLHF_DB"]) as store:  # the help screen says what each logged curve means
        logged = {row["name"] for row in store.metrics_since(0, run_id)}
    assert [name for name in logged if meaning(name) is None] == []

    # The export is a plain sequence-classification folder; score pairs with it independently.
    final = Path(run["output_dir"]) / "final"
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    question = [{"role": "user", "content": "What is 2 plus 3?"}]  # a model folder a server can render chats for
    for folder in (final.parent / "checkpoint-10", final):
        assert AutoTokenizer.from_pretrained(folder).apply_chat_template(
            question, tokenize=False, add_generation_prompt=True) == render_prompt([Turn("user", "What is 2 plus 3?")])
    recipe = load_recipe(TINY)
    pairs = load_preferences(recipe.rm.data, recipe.seed, recipe.rm.train.eval_ratio).eval  # never trained on
    assert len(pairs) >= 10
    wins = 0
    with torch.no_grad():
        for pair in pairs:
            ids = [tokenize_pair(tok, pair.prompt, answer) for answer in (pair.chosen, pair.rejected)]
            width = max(map(len, ids))
            batch = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
            scores = model(input_ids=batch, attention_mask=(batch != tok.pad_token_id).long()).logits.squeeze(-1)
            wins += int(scores[0] > scores[1])
    assert wins >= 0.8 * len(pairs)  # chance is a half


def test_reward_head_reads_the_last_real_token(workdir):
    """The trunk as the RM stage loads it: padding after the answer must not change the score, and the
    pad token must differ from the answer's closing </s> (else the head would read the token before it)."""
    spec = load_recipe(TINY).model
    tok = load_tokenizer(spec)
    model = load_reward_trunk(spec, tok.pad_token_id).eval()
    assert tok.pad_token_id != tok.eos_token_id
    ids = tokenize_pair(tok, (Turn("user", "What is 1 plus 1?"),), "1 plus 1 is 2.")
    assert ids[-1] == tok.eos_token_id
    single = torch.tensor([ids])
    padded = torch.tensor([ids + [tok.pad_token_id] * 5])
    truncated = torch.tensor([ids[:-1]])
    with torch.no_grad():
        a = model(input_ids=single).logits
        b = model(input_ids=padded, attention_mask=(padded != tok.pad_token_id).long()).logits
        c = model(input_ids=truncated).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c)  # the </s> itself is read


def test_num_layers_unfrozen_freezes_the_trunk_bottom(workdir):
    run_id, _ = run_stage("rm", str(TINY), ["train.max_steps=3", "num_layers_unfrozen=1", "train.eval_ratio=0"])
    trained = load_file(Path(run_row(run_id)["output_dir"]) / "final" / "model.safetensors")
    base = load_file(workdir / "demo" / "model" / "model.safetensors")
    changed = {name for name, value in base.items() if not torch.equal(trained[name], value)}
    top = {name for name in base if name.startswith(("transformer.h.3.", "transformer.ln_f."))}
    assert changed <= top  # embeddings and layers 0-2 untouched
    # Every top weight trains; ln_f.bias may not: it adds the same constant to r_chosen and r_rejected,
    # so the pairwise loss has no gradient for it.
    assert {n for n in top if n.endswith(".weight")} <= changed
    assert "score.weight" in trained


def test_the_ppo_scorer_batches_by_length_and_returns_scores_in_order(workdir):
    """RewardModelScorer sorts pairs by length into its batches: every score equals that pair scored alone,
    in the order the pairs came."""
    from engine.ppo.rewards import RewardModelScorer

    spec = load_recipe(TINY).model
    tok = load_tokenizer(spec)
    torch.manual_seed(0)
    model = load_reward_trunk(spec, tok.pad_token_id)
    model.save_pretrained(workdir / "rm")
    tok.save_pretrained(workdir / "rm")
    prompts = [(Turn("user", q),) for q in ("What is 1 plus 1?", "Say hello.", "Name a colour.", "Hi")] * 3
    answers = ["2.", "Hello there, how are you today? I am fine.", "Red.", "A much longer answer " * 6] * 3
    scorer = RewardModelScorer(str(workdir / "rm"), torch.device("cpu"), batch_size=5)
    together = scorer(prompts, answers)
    alone = torch.cat([scorer([p], [a]) for p, a in zip(prompts, answers)])
    assert together.shape == (12,) and torch.allclose(together, alone, atol=1e-5)
    assert len(set(together.tolist())) >= 4  # the pairs score differently: the order is tested
