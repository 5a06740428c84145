import pytest

from engine.template import SYSTEM, TEMPLATE, Turn, check_conversation, render, render_prompt, tokenize_conversation

DESIGN_TEMPLATE = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions. USER: {}\nASSISTANT:"
)


def test_template_is_the_recipe_string():
    assert TEMPLATE == DESIGN_TEMPLATE
    assert TEMPLATE.startswith(SYSTEM + " ")


def test_single_turn_prompt_renders_exactly():
    assert render_prompt([Turn("user", "你好")]) == DESIGN_TEMPLATE.format("你好")


def test_multi_turn_renders_exactly():
    turns = [Turn("user", "q1"), Turn("assistant", "a1"), Turn("user", "q2"), Turn("assistant", "a2")]
    assert render(turns) == DESIGN_TEMPLATE.format("q1") + " a1</s>USER: q2\nASSISTANT: a2</s>"
    assert render_prompt(turns[:3]) == DESIGN_TEMPLATE.format("q1") + " a1</s>USER: q2\nASSISTANT:"


@pytest.mark.parametrize(
    "turns, ends",
    [
        ([Turn("assistant", "a")], "assistant"),
        ([Turn("user", "q"), Turn("user", "q")], "user"),
        ([Turn("user", "q"), Turn("assistant", "a")], "user"),
        ([], "user"),
    ],
)
def test_bad_conversations_are_rejected(turns, ends):
    with pytest.raises(ValueError):
        check_conversation(turns, ends_with=ends)


def test_assistant_mask_covers_exactly_the_answers(demo_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_dir / "model")
    turns = [Turn("user", "What is 2 plus 3?"), Turn("assistant", "2 plus 3 is 5."),
             Turn("user", "再加一呢？"), Turn("assistant", "等于六。")]
    out = tokenize_conversation(tok, turns)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    assert tok.decode(ids) == render(turns)
    answer_ids = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(answer_ids) == " 2 plus 3 is 5.</s> 等于六。</s>"
    assert ids.count(tok.eos_token_id) == 2  # "</s>" is the tokenizer's eos, one per assistant turn
    # The prompt tokenizes the same inside the conversation as alone (what generation will see).
    prompt_ids = tok(render_prompt(turns[:1]))["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids and not any(mask[: len(prompt_ids)])


def test_the_chat_template_exports_carry_renders_as_the_recipe_does(demo_dir):
    from jinja2.exceptions import TemplateError
    from transformers import AutoTokenizer

    from engine.template import with_chat_template

    tok = with_chat_template(AutoTokenizer.from_pretrained(demo_dir / "model"))
    turns = [Turn("user", "What's \"2 plus 3\"?\nSay it."), Turn("assistant", "2 plus 3 is 5."),
             Turn("user", "再加一呢？"), Turn("assistant", "等于六。")]
    messages = [{"role": t.role, "content": t.content} for t in turns]
    assert tok.apply_chat_template(messages, tokenize=False) == render(turns)
    for end in (1, 3):  # a prompt: it ends with "ASSISTANT:" already, generation prompt or not
        for generation in (True, False):
            assert tok.apply_chat_template(messages[:end], tokenize=False, add_generation_prompt=generation) == \
                render_prompt(turns[:end])
    assert list(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]) == \
        tokenize_conversation(tok, turns)["input_ids"]
    with pytest.raises(TemplateError, match="user and assistant turns only .* not system"):
        tok.apply_chat_template([{"role": "system", "content": "x"}, *messages[:1]], tokenize=False)
    # A tokenizer that starts a text with BOS (Llama's): training's first piece had it, so the template writes
    # it (apply_chat_template and servers tokenize the text without special tokens)
    from tokenizers.processors import TemplateProcessing

    bos = AutoTokenizer.from_pretrained(demo_dir / "model")
    bos._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos.bos_token_id)])
    with_chat_template(bos)
    trained = tokenize_conversation(bos, turns)["input_ids"]
    assert trained[0] == bos.bos_token_id and trained.count(bos.bos_token_id) == 1
    assert list(bos.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]) == trained
    assert bos.apply_chat_template(messages, tokenize=False) == "<s>" + render(turns)


def test_truncation_keeps_ids_and_mask_aligned(demo_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_dir / "model")
    out = tokenize_conversation(tok, [Turn("user", "q " * 50), Turn("assistant", "a")], max_length=20)
    assert len(out["input_ids"]) == len(out["assistant_masks"]) == 20
    assert not any(out["assistant_masks"])
