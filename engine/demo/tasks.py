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


def eval_items(seed: int = 0, per_class: int = 8) -> list[tuple[str, str, str]]:
    """(question, reference answer, BELLE class) for the demo's own eval set in BELLE's format."""
    rng = random.Random(seed + 1)
    kinds = [("math", _arithmetic(rng)), ("closed qa", _translation()), ("open qa", _opposites())]
    items = [(qa.question, qa.answer, cls) for cls, pairs in kinds for qa in rng.sample(pairs, per_class)]
    rng.shuffle(items)  # so that the first N (--limit) mix the classes
    return items
