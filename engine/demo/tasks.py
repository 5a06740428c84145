"""Small bilingual question/answer tasks for the demo, generated from templates written for this project.

Every pair has a good answer and a bad one (curt or wrong), so preference data is separable by design.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

WORDS = [
    ("apple", "苹果"), ("water", "水"), ("book", "书"), ("cat", "猫"), ("dog", "狗"), ("moon", "月亮"),
    ("sun", "太阳"), ("tea", "茶"), ("river", "河"), ("mountain", "山"), ("friend", "朋友"), ("school", "学校"),
    ("bread", "面包"), ("bird", "鸟"), ("window", "窗户"), ("sea", "大海"),
]
OPPOSITES = [
    ("hot", "cold", "热", "冷"), ("big", "small", "大", "小"), ("fast", "slow", "快", "慢"),
    ("early", "late", "早", "晚"), ("light", "dark", "亮", "暗"), ("open", "closed", "开", "关"),
]


@dataclass(frozen=True)
class QA:
    instruction: str
    input: str
    answer: str
    bad_answer: str
    key: str  # what a correct answer must contain (the sum, the translated word, the opposite)

    @property
    def question(self) -> str:
        return f"{self.instruction}\n{self.input}" if self.input else self.instruction


def _arithmetic(rng: random.Random) -> list[QA]:
    out = []
    for a in range(1, 10):
        for b in range(1, 10, 2):
            wrong = a + b + rng.choice([-2, -1, 1, 2])
            out.append(QA(f"What is {a} plus {b}?", "", f"{a} plus {b} is {a + b}.", f"{wrong}?", str(a + b)))
            out.append(QA(f"{a}加{b}等于几？", "", f"{a}加{b}等于{a + b}。", "不知道。", str(a + b)))
    return out


def _translation() -> list[QA]:
    out = []
    for en, zh in WORDS:
        out.append(QA("Translate the word into Chinese.", en, f'"{en}" in Chinese is {zh}.', "No.", zh))
        out.append(QA("把这个词翻译成英文。", zh, f"“{zh}”的英文是 {en}。", "不。", en))
    return out


def _opposites() -> list[QA]:
    out = []
    for en_a, en_b, zh_a, zh_b in OPPOSITES:
        answer = f"The opposite of {en_a} is {en_b}."
        out.append(QA(f"What is the opposite of {en_a}?", "", answer, "I don't know.", en_b))
        out.append(QA(f"“{zh_a}”的反义词是什么？", "", f"“{zh_a}”的反义词是“{zh_b}”。", "不知道。", zh_b))
    return out


def qa_pairs(seed: int = 0) -> list[QA]:
    rng = random.Random(seed)
    pairs = _arithmetic(rng) + _translation() + _opposites()
    rng.shuffle(pairs)
    return pairs


# One small template per BELLE class the other tasks do not cover, for the demo's eval set only: (question,
# reference) pairs; generation and brainstorming have no reference, as in BELLE's own set.
REWRITES = [("I walk to school.", "I walked to school."), ("She reads a book.", "She read a book."),
            ("We drink tea.", "We drank tea."), ("他喝水。", "他喝了水。")]
KINDS = [("an apple", "a fruit"), ("a cat", "an animal"), ("a school", "a place"), ("bread", "a food"),
         ("a bird", "an animal"), ("a river", "a place")]
SUMMARIES = [("The cat sat on the warm mat all afternoon and slept.", "A cat slept on a mat."),
             ("It rained all day, so the children read books inside.", "Rain kept the children reading inside."),
             ("小明早上七点起床，吃了面包，然后去学校。", "小明早起吃饭后上学。")]
EXTRACTS = [("She bought 7 apples at the market.", "7"), ("The river is 12 miles long.", "12"),
            ("他有3本书。", "3"), ("We met 5 friends by the sea.", "5")]


def _class_items(cls: str, rng: random.Random) -> list[tuple[str, str]]:
    if cls == "math":
        return [(qa.question, qa.answer) for qa in _arithmetic(rng)]
    if cls == "code":
        return [(f"What does Python print for print({a} * {b})?", f"It prints {a * b}.")
                for a in range(2, 6) for b in range(2, 6)]
    if cls == "rewrite":
        return [(f"Rewrite the sentence in the past tense.\n{s}", r) for s, r in REWRITES]
    if cls == "classification":
        return [(f"Is {w} a fruit, an animal, a food or a place?", f"{w[0].upper()}{w[1:]} is {k}.") for w, k in KINDS]
    if cls == "generation":
        return [(f"Write one sentence about the {en}.", "") for en, _ in WORDS]
    if cls == "summarization":
        return [(f"Summarise in one short sentence.\n{text}", short) for text, short in SUMMARIES]
    if cls == "extract":
        return [(f"Which number is in the sentence?\n{text}", number) for text, number in EXTRACTS]
    if cls == "open qa":
        return [(qa.question, qa.answer) for qa in _opposites()]
    if cls == "brainstorming":
        return [(f"Name three things that are {a}.", "") for a, *_ in OPPOSITES]
    return [(qa.question, qa.answer) for qa in _translation()]  # closed qa


EVAL_CLASSES = ("math", "code", "rewrite", "classification", "generation", "summarization", "extract", "open qa",
                "brainstorming", "closed qa")


def eval_items(seed: int = 0, per_class: int = 3) -> list[tuple[str, str, str]]:
    """(question, reference answer, BELLE class) for the demo's own eval set in BELLE's format: every one of
    BELLE's ten classes, so that the score table has every column and its macro averages."""
    rng = random.Random(seed + 1)
    items = [(q, a, cls) for cls in EVAL_CLASSES for q, a in rng.sample(_class_items(cls, rng), per_class)]
    rng.shuffle(items)  # so that the first N (--limit) mix the classes
    return items
