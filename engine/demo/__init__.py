"""The embedded tiny demo: a 4-layer BLOOM, a byte-level BPE tokenizer and small data sets.

Everything is made here from text the project ships and written with `save_pretrained`, so the demo
(and every test) goes through the real loading code with no hub access. `init_demo(folder)` writes:

    model/                 BLOOM (hidden 64, 4 layers) + tokenizer, safetensors
    data/sft_alpaca.jsonl  instruction / input / output
    data/sft_sharegpt.json conversations [{from, value}] (a JSON array, multi-turn)
    data/sft_messages.jsonl messages [{role, content}]
    data/sft_prompt_completion.jsonl
    data/preferences.jsonl prompt / chosen / rejected
    data/preferences_hh.jsonl chosen / rejected as "\\n\\nHuman: … \\n\\nAssistant: …" dialogues
    data/prompts.jsonl     prompt (for PPO rollouts)
    eval/eval_set.json     30 questions in BELLE's format (JSON Lines), three of each of its ten classes
    eval/eval_prompt.json  a judge instruction per class, BELLE's format (written for the demo)
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from engine.demo.tasks import QA, eval_items, qa_pairs
from engine.template import Turn, render

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
VOCAB_SIZE = 1024


def corpus_lines() -> list[str]:
    return resources.files("engine.demo").joinpath("corpus.txt").read_text(encoding="utf-8").splitlines()


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_data(folder: Path, pairs: list[QA]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {name: folder / name for name in (
        "sft_alpaca.jsonl", "sft_sharegpt.json", "sft_messages.jsonl", "sft_prompt_completion.jsonl",
        "preferences.jsonl", "preferences_hh.jsonl", "prompts.jsonl",
    )}
    # Sources are disjoint slices, so a record held out of one is not trained on through another.
    q = len(pairs) // 4
    _write_jsonl(files["sft_messages.jsonl"], [
        {"messages": [{"role": "user", "content": qa.question}, {"role": "assistant", "content": qa.answer}]}
        for qa in pairs[:q]
    ])
    _write_jsonl(files["sft_prompt_completion.jsonl"], [
        {"prompt": qa.question, "completion": qa.answer} for qa in pairs[q : 2 * q]
    ])
    _write_jsonl(files["sft_alpaca.jsonl"], [
        {"instruction": qa.instruction, "input": qa.input, "output": qa.answer} for qa in pairs[2 * q : 3 * q]
    ])
    rest = pairs[3 * q :]
    conversations = [
        {"conversations": [
            {"from": "human", "value": first.question}, {"from": "gpt", "value": first.answer},
            {"from": "human", "value": second.question}, {"from": "gpt", "value": second.answer},
        ]}
        for first, second in zip(rest[0::2], rest[1::2])
    ]
    files["sft_sharegpt.json"].write_text(json.dumps(conversations, ensure_ascii=False, indent=1), encoding="utf-8")
    _write_jsonl(files["preferences.jsonl"], [
        {"prompt": qa.question, "chosen": qa.answer, "rejected": qa.bad_answer} for qa in pairs[q:]
    ])
    _write_jsonl(files["preferences_hh.jsonl"], [
        {
            "chosen": f"\n\nHuman: {qa.question}\n\nAssistant: {qa.answer}",
            "rejected": f"\n\nHuman: {qa.question}\n\nAssistant: {qa.bad_answer}",
        }
        for qa in pairs[:q]
    ])
    _write_jsonl(files["prompts.jsonl"], [{"prompt": qa.question} for qa in pairs])
    return files


RUBRIC = ("You are grading an answer to a {what} question against the reference answer. Score it between "
          "0 and 1 and reply in the form \"Score: x\".")


def write_eval_set(folder: Path, seed: int = 0) -> dict[str, Path]:
    """The demo's own small eval set, in the layout `rlhf eval belle --eval-dir` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    items = eval_items(seed)
    _write_jsonl(folder / "eval_set.json", [{"question": q, "std_answer": a, "class": c} for q, a, c in items])
    _write_jsonl(folder / "eval_prompt.json", [{"class": c, "prompt": RUBRIC.format(what=c)}
                                               for c in sorted({c for _, _, c in items})])
    return {"eval_set": folder / "eval_set.json", "eval_prompt": folder / "eval_prompt.json"}


def train_tokenizer(texts: list[str], folder: Path) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(folder)
    return fast


def build_model(tokenizer: object, folder: Path, seed: int = 0) -> None:
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(seed)
    config = BloomConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        n_layer=4,
        n_head=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = BloomForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)


def init_demo(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the demo model, tokenizer and data under `folder`; returns the paths."""
    folder = Path(folder)
    pairs = qa_pairs(seed)
    files = write_data(folder / "data", pairs)
    texts = corpus_lines()
    for qa in pairs:
        texts.append(render((Turn("user", qa.question), Turn("assistant", qa.answer))))
        texts.append(qa.bad_answer)
    model_dir = folder / "model"
    tokenizer = train_tokenizer(texts, model_dir)
    build_model(tokenizer, model_dir, seed)
    evaluation = write_eval_set(folder / "eval", seed)
    return {"model": model_dir, **{name.split(".")[0]: path for name, path in files.items()}, **evaluation}
