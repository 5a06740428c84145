"""The BELLE eval set as shipped, the score parser on judge replies, and the score table's arithmetic."""

import json
from pathlib import Path

import pytest

from engine.belle import CATEGORIES, BelleError, coverage, judge_prompt, load_items, normalise_class
from engine.judge.parse import parse_score
from engine.scores import MACRO, MACRO_WO, paired_deltas, reference_row, render, summarize

BELLE = Path(__file__).resolve().parents[2] / "shared" / "belle"


@pytest.mark.skipif(not (BELLE / "eval_set.json").is_file(), reason=f"the BELLE eval files are not at {BELLE}")
def test_every_one_of_the_1000_questions_meets_its_class_prompt():
    items = load_items(BELLE)
    assert len(items) == 1000
    assert {i.category for i in items} == set(CATEGORIES)
    counts = {c: sum(1 for i in items if i.category == c) for c in CATEGORIES}
    assert counts["others"] == 113 and counts["closed qa"] == 52 and counts["open qa"] == 285
    assert sum(1 for i in items if not i.reference.strip()) == 369
    # BELLE's scorer gives the reference to every class but generation, brainstorming and rewrite; 39
    # rewrite items have one all the same.
    assert sum(1 for i in items if not i.judged_with_reference) == 408
    with_ref = [i for i in items if i.cls == "rewrite" and i.reference.strip()]
    assert len(with_ref) == 39
    item = with_ref[0]
    assert item.reference not in judge_prompt(item, "答")
    assert item.reference in judge_prompt(item, "答", rewrite_reference=True)
    assert "; 408 judged without the reference (BELLE's rule), 39 of them rewrite items" in coverage(items)
    assert ("; 369 judged without the reference (BELLE's rule), the 39 rewrite items that have one are given it"
            in coverage(items, rewrite_reference=True))  # it said 408 with the flag too
    closed = next(i for i in items if i.category == "closed qa")
    prompt = judge_prompt(closed, "我的回答")
    assert prompt.startswith(closed.rubric) and closed.question in prompt and closed.reference in prompt
    assert prompt.endswith("模型回答：' 我的回答'。请针对模型回答给出得分，顺便给出理由：")

    # BELLE's file interleaves its classes unevenly: its first 40 questions miss columns; 4 per class fill
    # every one.
    assert {i.category for i in load_items(BELLE, limit=40)} != set(CATEGORIES)
    sample = load_items(BELLE, per_class=4)
    assert len(sample) == 40 and {i.category for i in sample} == set(CATEGORIES)
    for cls in {i.cls for i in items}:  # each class's first four, by their line in the file
        assert [i.id for i in sample if i.cls == cls] == [i.id for i in items if i.cls == cls][:4]


def test_the_demo_eval_set_fills_every_column_of_the_score_table(demo_dir):
    """The demo's own questions, three of each of BELLE's ten classes: every category has items, and those
    without a reference are the classes BELLE judges without one."""
    items = load_items(demo_dir / "eval")
    assert {i.category for i in items} == set(CATEGORIES) and len({i.cls for i in items}) == 10
    assert all(sum(1 for i in items if i.cls == cls) == 3 for cls in {i.cls for i in items})
    assert {i.cls for i in items if not i.reference} == {"generation", "brainstorming"}
    assert len({i.question for i in items}) == len(items)


def test_class_names_are_normalised():
    assert normalise_class("closed\xa0qa") == normalise_class("closed QA") == "closed qa"
    assert normalise_class(" Open  QA ") == "open qa"


def test_a_bad_eval_folder_names_file_and_line(tmp_path):
    (tmp_path / "eval_prompt.json").write_text('{"class": "math", "prompt": "p"}\n', encoding="utf-8")
    (tmp_path / "eval_set.json").write_text(
        '{"question": "q", "std_answer": "a", "class": "math"}\n'
        '{"question": "q2", "std_answer": "", "class": "poetry"}\n',
        encoding="utf-8")
    with pytest.raises(BelleError, match=r"eval_set.json:2: class 'poetry' has no prompt"):
        load_items(tmp_path)
    with pytest.raises(BelleError, match=r"eval_set.json:2: class 'poetry' has no prompt"):
        load_items(tmp_path, limit=1)  # past the part taken too: the reward-model judge reads the whole set
    (tmp_path / "eval_set.json").write_text('{"question": "q"\n', encoding="utf-8")
    with pytest.raises(BelleError, match=r"eval_set.json:1: not valid JSON"):
        load_items(tmp_path)
    (tmp_path / "eval_set.json").write_text('[{"question": "q", "std_answer": "a", "class": "math"},\n]\n',
                                            encoding="utf-8")
    with pytest.raises(BelleError, match=r"eval_set.json:1: a JSON array; the eval set is JSON Lines"):
        load_items(tmp_path)
    (tmp_path / "eval_set.json").write_text('[{"question": "q", "std_answer": "a", "class": "math"}]\n',
                                            encoding="utf-8")  # on one line, it parses: still not JSON Lines
    with pytest.raises(BelleError, match=r"eval_set.json:1: a JSON array; the eval set is JSON Lines"):
        load_items(tmp_path)
    # An editor's byte-order mark, and a line separator inside a question: one question, whole.
    (tmp_path / "eval_set.json").write_text('\ufeff{"question": "a\u2028b", "std_answer": "a", "class": "math"}\n',
                                            encoding="utf-8")
    assert [(i.id, i.question) for i in load_items(tmp_path)] == [(1, "a\u2028b")]
    (tmp_path / "eval_set.json").write_bytes(b'{"question": "q1", "std_answer": "a", "class": "math"}\r'
                                             b'{"question": "q2", "std_answer": "a", "class": "math"}\r')
    assert [(i.id, i.question) for i in load_items(tmp_path)] == [(1, "q1"), (2, "q2")]  # an old Mac's line ends
    (tmp_path / "eval_set.json").write_bytes('{"question": "q1", "std_answer": "a", "class": "math"}\n'
                                             '{"question": "问题", "std_answer": "a", "class": "math"}\n'.encode("gbk"))
    with pytest.raises(BelleError, match=r"eval_set.json:2: not UTF-8 \(byte 0xce\): it reads as GB18030 \(or the "
                                         r"file is damaged there\); convert"):
        load_items(tmp_path)
    with pytest.raises(BelleError, match=r"nodir: no such folder \(an eval folder holds eval_set.json and "):
        load_items(tmp_path / "nodir")
    with pytest.raises(BelleError, match=rf"eval_set.json: a file; give the folder that holds it \({tmp_path}\)"):
        load_items(tmp_path / "eval_set.json")  # the set itself, not its folder


# (reply, the answer it judged, expected score or None)
REPLIES = [
    ("得分: 0.8", "", 0.8), ("得分：0.8分", "", 0.8), ("**得分:** 0.5", "", 0.5), ("得分为0.5", "", 0.5),
    ("Score: 0.8", "", 0.8), ("score: 1", "", 1.0), ("得分：1分\n理由：回答完全正确。", "", 1.0),
    ("得分: 0\n理由：答非所问。", "", 0.0), ("得分：0.0", "", 0.0), ("**得分**：0.7", "", 0.7),
    ("得分: 0.65", "", 0.65), ("得分是0.9", "", 0.9), ("得分应该是 0.3", "", 0.3), ("最终得分：0.6", "", 0.6),
    ("评分：0.4", "", 0.4), ("分数: 0.75", "", 0.75), ("我给出的得分为：0.85分。", "", 0.85),
    ("得分: 8/10", "", 0.8), ("得分：80%", "", 0.8), ("得分: 1/1", "", 1.0), ("得分：3/5", "", 0.6),
    ("满分为1分，得分0.8", "", 0.8), ("理由：模型回答正确。\n得分：0.9", "", 0.9),
    ("模型回答基本正确，但缺少细节。得分: 0.6", "", 0.6), ("得分:0.5\n\n理由:部分正确", "", 0.5),
    ("得分：\n0.7", "", None),  # the number is on another line: not read as a score
    ("Score: 0.2\nReason: off topic.", "", 0.2), ("SCORE: 0.9", "", 0.9), ("The score is 0.7.", "", 0.7),
    ("得分: 0.8。", "", 0.8), ("得分（满分1分）：0.6", "", 0.6), ("得分 0.95", "", 0.95),
    ("【得分】0.5", "", 0.5), ("得分：0.5 分", "", 0.5), ("得分= 0.4", "", 0.4),
    ("得分: 0,8", "", 0.8), ("Score - 0.8", "", 0.8), ("得分：8,5/10", "", 0.85),  # a decimal comma; a dash
    # the rubric restated after the score: a range is no score (it was read as 0)
    ("模型回答较好。得分: 0.71\n\n注：分数范围0-1", "", 0.71), ("得分：0.6（分数在0到1之间）", "", 0.6),
    ("Score: 0.8 (score range 0 to 1)", "", 0.8), ("得分: 0.3。评分标准：分数为0~1。", "", 0.3),
    ("Score: 0.9; the score is between 0 and 1", "", 0.9), ("得分: 0.71\n(分数范围0.0-1.0)", "", 0.71),
    ("得分: 0.8\n- 1. 准确", "", 0.8), ("Score: 0.75 and 2 issues", "", 0.75), ("得分：0.6（分数在0和1之间）", "", 0.6),
    ("得分：0.6-0.8", "", None), ("Score: 0.9 – 1. Accuracy", "", None), ("分数范围10-100", "", None),
    ("分数在0到1之间，我给0.8分。", "", None), ("评分区间：0 – 1", "", None),  # the range alone
    # unparseable or out of range: unscored, never 0
    ("这个回答很好。", "", None), ("", "", None), ("理由：回答不完整。", "", None), ("得分: 8", "", None),
    ("得分：9分（满分10分）", "", None), ("得分: 高", "", None), ("I cannot judge this answer.", "", None),
    ("得分：N/A", "", None), ("分数很高", "", None), ("得分: 0/0", "", None),
    ("Score: -0.5 (the answer is harmful)", "", None), ("得分：−1", "", None), ("score: -.2", "", None),
    # the judge quotes the answer, which carries a score of its own
    ("得分：0.6\n理由：模型回答中写道“我觉得自己得分: 1”，这是自夸。", "我觉得自己得分: 1，非常好", 0.6),
    ("模型回答：'总分得分: 1，完美。'\n得分：0.2", "总分得分: 1，完美。", 0.2),
    ("模型回答：“作者说得分: 0.9”。我认为得分：0.4", "作者说得分: 0.9", 0.4),
    ("得分: 0.3\n模型回答引用了“评分：1.0”这种说法。", "专家评分：1.0分", 0.3),
    ("得分: 1", "得分: 1", 1.0),  # the same text as the answer and nothing else: still the judge's score
    ("得分：0.7。模型回答“得分：0.1”是错误的。", "他的得分：0.1。", 0.7),
    ("根据标准回答，模型回答正确。得分：1.0", "", 1.0), ("得分: .5", "", 0.5),
    ("得分: 1e-1", "", 0.1), ("Score: 5E-1", "", 0.5), ("得分: 1e1", "", None),  # an exponent (was read as 1)
    # the only score is the answer's own, quoted: the judge gave none
    ('回答中写道"本题得分: 1，因为正确"，但这是错的。', "本题得分: 1，因为正确", None),
]


def test_the_score_parser_on_real_looking_replies():
    assert len(REPLIES) >= 50
    for reply, answer, expected in REPLIES:
        got = parse_score(reply, answer)
        if expected is None:
            assert got.score is None and got.problem, (reply, got)
        else:
            assert got.score == pytest.approx(expected), (reply, got)


def test_the_aggregator_reproduces_the_published_macro_averages():
    row = reference_row()
    assert round(row.cells[MACRO].mean, 3) == 0.728
    assert round(row.cells[MACRO_WO].mean, 3) == 0.742


def _items(scores_by_category, start=0):
    items, k = [], start
    for category, scores in scores_by_category.items():
        for s in scores:
            items.append({"item_id": k, "question": f"question {k}", "category": category, "score": s,
                          "status": "unscored" if s is None else "scored"})
            k += 1
    return items


def test_summaries_count_unscored_apart_and_intervals_bracket_the_mean():
    base = {c: [0.2, 0.4, 0.6, 0.8] for c in CATEGORIES}
    base["others"] = [1.0, 1.0, None]  # one reply without a score: not a 0
    row = summarize("a", _items(base), run_id=1)
    assert row.cells["others"].mean == 1.0 and row.cells["others"].n == 2 and row.cells["others"].unscored == 1
    assert row.cells[MACRO].mean == pytest.approx((1.0 + 8 * 0.5) / 9)
    assert row.cells[MACRO_WO].mean == pytest.approx(0.5)
    for cell in row.cells.values():
        assert cell.low <= cell.mean <= cell.high
    table = render([reference_row(), row])
    assert "**" not in table and "0.728" in table  # the best of one run says nothing; published row shown
    lower = summarize("b", [dict(i, score=0.5) if i["category"] == "others" and i["score"] is not None else i
                            for i in _items(base)], run_id=2)
    table = render([reference_row(), row, lower])
    assert "| a (evaluation run 1) | **1.000" in table and "| b (evaluation run 2) | 0.500" in table  # ties: both
    as_json = json.loads(render([row], "json"))
    assert as_json[0]["columns"]["others"]["unscored"] == 1
    assert "others unscored" in render([row], "csv").splitlines()[0]
    assert "others not judged" in render([row], "csv").splitlines()[0]
    assert f"{row.cells['others'].mean:.3f} [{row.cells['others'].low:.3f}, " in table  # as many decimals


def test_the_table_says_how_long_the_answers_were_and_how_many_the_limit_cut():
    """A judge may favour long answers and a policy learns to write them: the length beside the scores.
    Answers not there yet (None) do not count."""
    import csv
    import io

    items = _items({c: [0.5, 0.7] for c in CATEGORIES})
    for k, item in enumerate(items):
        item.update(answer_tokens=[10, 30][k % 2], finished=["eos", "length"][k % 2])
    items[0].update(answer_tokens=None, finished=None, score=None, status=None)
    row = summarize("a", items, run_id=4)
    lengths = row.answer_lengths
    assert (lengths.count, lengths.cut) == (17, 9) and lengths.mean_tokens == pytest.approx((8 * 10 + 9 * 30) / 17)
    shown = "answers 21 tokens on average, 9 of 17 cut at the token limit"
    assert lengths.shown() == shown
    assert f"evaluation run 4: not judged yet; {shown}; n / unscored / not judged per column" in render([row])
    exported = json.loads(render([reference_row(), row], "json"))
    assert exported[0]["answers"] is None  # the published row: scores only
    assert exported[1]["answers"] == {"count": 17, "mean_tokens": pytest.approx(20.588235, abs=1e-6), "cut": 9}
    header = render([row], "csv").splitlines()[0].split(",")
    assert header[-3:] == ["answers", "answer tokens mean", "answers cut"]  # the category columns where they were
    as_csv = list(csv.DictReader(io.StringIO(render([reference_row(), row], "csv"))))
    assert as_csv[0]["answers"] == as_csv[0]["answers cut"] == ""  # and the columns after them in their place:
    assert float(as_csv[0]["others mean"]) == pytest.approx(reference_row().cells["others"].mean, abs=1e-6)
    assert [as_csv[1]["answers"], as_csv[1]["answer tokens mean"], as_csv[1]["answers cut"]] == \
        ["17", "20.588235", "9"]
    assert summarize("b", _items({"others": [None]}), run_id=5).answer_lengths.shown() == "no answer yet"


def test_paired_deltas_use_the_same_items():
    a = _items({c: [0.5] * 6 for c in CATEGORIES})
    b = [dict(i, score=i["score"] + 0.1) for i in a]
    b[0]["score"] = None  # unscored in b: the pair leaves both sides
    deltas = {d.column: d for d in paired_deltas(a, b)}
    assert deltas[MACRO].mean == pytest.approx(0.1)
    assert deltas["others"].n == 5 and deltas[MACRO].low == pytest.approx(0.1)

    subset = b[:8]  # a run of the first 8 items of the same eval set (--limit 8): paired where both have them
    deltas = {d.column: d for d in paired_deltas(a, subset)}
    assert deltas[MACRO].n == 7 and deltas["others"].n == 5 and deltas[MACRO].mean is None  # 2 categories only
    assert deltas[MACRO].shown().startswith("- (no pair in ") and "others" not in deltas[MACRO].shown()
    deltas = {d.column: d for d in paired_deltas(a, b[:7])}  # one pair in the second category
    assert deltas[CATEGORIES[1]].n == 1 and deltas[CATEGORIES[1]].shown() == "+0.100 (too few for an interval)"


def test_a_category_of_one_score_has_no_interval_nor_has_a_macro_over_it():
    scores = {c: [0.2, 0.6] for c in CATEGORIES}
    row = summarize("a", _items(scores), run_id=1)
    assert all(cell.low < cell.mean < cell.high for cell in row.cells.values())
    scores[CATEGORIES[0]] = [0.5]  # one score resamples to itself: an interval of no width
    row = summarize("a", _items(scores), run_id=1)
    first, other = row.cells[CATEGORIES[0]], row.cells[CATEGORIES[1]]
    assert first.mean == 0.5 and first.low is None and first.high is None
    assert other.low < other.mean < other.high  # the other categories keep theirs
    assert row.cells[MACRO].mean is not None and row.cells[MACRO].low is None
    assert CATEGORIES[0] == "others" and row.cells[MACRO_WO].low < row.cells[MACRO_WO].mean  # it leaves others out
    table = render([row])
    assert "0.500 (too few for an interval)" in table and "[0.500, 0.500]" not in table
    scores[CATEGORIES[1]] = [0.5]  # a category of its own: neither macro average has an interval
    assert summarize("a", _items(scores), run_id=1).cells[MACRO_WO].low is None


def test_runs_of_two_eval_sets_are_never_paired():
    from engine.scores import DifferentItems

    a = _items({c: [0.5] * 2 for c in CATEGORIES})
    other_set = [dict(i, question=f"another {i['item_id']}") for i in a]
    with pytest.raises(DifferentItems, match=r"run 4 and run 8 hold different questions \(item 0: "
                                             r"'question 0' against 'another 0'\)"):
        paired_deltas(a, other_set, "run 4", "run 8")
    moved = [dict(i, category="rewrite" if i["category"] != "rewrite" else "extract") for i in a]
    with pytest.raises(DifferentItems):
        paired_deltas(a, moved)


def test_runs_of_two_judges_are_never_paired_nor_ranked_and_a_tie_as_shown_is_a_tie():
    from engine.scores import DifferentJudges, best_per_column

    llm = [dict(i, judge="openai:gpt-4o") for i in _items({c: [0.8] * 2 for c in CATEGORIES})]
    rm = [dict(i, judge="rm:runs/2/final", score=0.5) for i in llm]
    stamped = [dict(i, judge="rm:runs/2/final (exported 2026-11-29 20:00:00 UTC)") for i in rm]
    with pytest.raises(DifferentJudges, match=r"recorded before its judge's name gave the export's time"):
        paired_deltas(rm, stamped, "run 23", "run 24")
    with pytest.raises(DifferentJudges, match=r"run 7 was judged by openai:gpt-4o and run 23 by rm:runs/2/final"):
        paired_deltas(llm, rm, "run 7", "run 23")
    rows = [reference_row(), summarize("a", llm, 7, "openai:gpt-4o"), summarize("b", rm, 23, "rm:runs/2/final"),
            summarize("c", [dict(i, score=0.9) for i in rm], 24, "rm:runs/2/final")]
    # Ranked among the judge of most runs (the RM's, here); the other judge's run is shown, not ranked.
    assert best_per_column(rows)[MACRO] == {3} and all(1 not in best for best in best_per_column(rows).values())
    table = render(rows)
    assert ("best is marked among the runs judged by rm:runs/2/final on the same 18 questions only (another "
            "judge's scores are on another scale)") in table
    # Two runs of each judge: each pair is ranked on its own, and a run added to one pair leaves the other's
    # best as it was (the bold used to follow whichever judge had the most runs).
    pairs = [*rows, summarize("a2", [dict(i, score=0.9) for i in llm], 8, "openai:gpt-4o")]
    assert best_per_column(pairs)[MACRO] == {3, 4}
    more = [*pairs, summarize("f", [dict(i, score=0.6) for i in rm], 25, "rm:runs/2/final")]
    assert best_per_column(more)[MACRO] == {3, 4}
    assert ("best is marked within each group of runs judged alike on the same questions: runs 7, 8 "
            "(openai:gpt-4o, 18 questions); runs 23, 24, 25 (rm:runs/2/final, 18 questions) (another judge's scores "
            "are on another scale)") in render(more)
    # A judge that never scored (down for every call) ranks nothing: its failed run left every column plain.
    down = summarize("d", [dict(i, score=None, status="failed", judge="openai:down") for i in llm], 25, "openai:down")
    downs = [reference_row(), down, down, summarize("a", llm, 7, "openai:gpt-4o"),
             summarize("e", [dict(i, score=0.7) for i in llm], 8, "openai:gpt-4o")]
    assert best_per_column(downs)[MACRO] == {3}
    # A run of 7 of the questions is not the best of the 18-question runs for having done well on 7.
    subset = summarize("s", [dict(i, score=0.95) for i in llm[:7]], 26, "openai:gpt-4o")
    mixed = [reference_row(), summarize("a", llm, 7, "openai:gpt-4o"), subset,
             summarize("e", [dict(i, score=0.7) for i in llm], 8, "openai:gpt-4o")]
    best = best_per_column(mixed)
    assert all(2 not in marked for marked in best.values()) and best[llm[0]["category"]] == {1}
    assert ("best is marked among the runs judged by openai:gpt-4o on the same 18 questions only (a run of other "
            "questions averages other questions)") in render(mixed)
    # A run whose calls failed on 6 of the 18 questions averages the other 12: shown, not the best for it.
    failed = [dict(i, score=None, status="failed") if k % 3 == 0 else dict(i, score=0.99) for k, i in enumerate(llm)]
    partial = [reference_row(), summarize("a", llm, 7, "openai:gpt-4o"), summarize("p", failed, 9, "openai:gpt-4o"),
               summarize("e", [dict(i, score=0.7) for i in llm], 8, "openai:gpt-4o")]
    best = best_per_column(partial)
    assert best[MACRO] == {1} and all(2 not in marked for marked in best.values())
    assert ("best is marked among the runs judged by openai:gpt-4o on the same 18 questions only (questions not "
            "judged, their means over fewer questions: run 9 (6 of 18))") in render(partial)
    alone = render([reference_row(), partial[1]])  # one run (its own results.md): nothing to rank or explain
    assert "no run is marked best" not in alone and "best is marked" not in alone
    one_whole = [reference_row(), partial[1], partial[2]]  # nothing bold, and the note does not say otherwise
    assert not best_per_column(one_whole)
    assert ("no run is marked best: no two runs were judged by one judge on the same questions, each of them judged "
            "(questions not judged") in render(one_whole)
    only_partial = [reference_row(), partial[2], partial[2]]
    assert ("no run is marked best: every scored run has questions not judged, their means over fewer questions: "
            "run 9 (6 of 18), run 9 (6 of 18); resume them to judge the rest") in render(only_partial)
    assert not best_per_column(only_partial)
    # One judge, means that differ in the eighth decimal (same answers, float noise): both best, as shown.
    close = [summarize(name, [dict(i, score=i["score"] + eps) for i in llm], k, "openai:gpt-4o")
             for k, (name, eps) in enumerate((("a", 0.0), ("b", 1e-8)), start=1)]
    assert best_per_column([reference_row(), *close])[MACRO] == {1, 2}
    waiting = summarize("c", [dict(i, score=None, status=None, judge=None) for i in llm], 3)
    assert "evaluation run 3: not judged yet;" in render([waiting])


def test_runs_judged_with_other_class_prompts_are_never_paired_nor_ranked_together():
    """One judge, but eval_prompt.json edited between two runs: the judge was asked another question, so the
    scores are on another scale (the prompt is read off the stored judge prompt: the rubric, then the
    question); a reward model's verdicts read no prompt."""
    from engine.scores import DifferentJudges, best_per_column, rubrics_of

    def judged(rubric, score):
        return [dict(i, judge="openai:gpt-4o", score=score, **{"class": i["category"]},
                     judge_prompt=f"{rubric} {i['question']}  模型回答： 'x'") for i in _items(
            {c: [0.5] * 2 for c in CATEGORIES})]

    a, b, edited = judged("请打分。", 0.8), judged("请打分。", 0.7), judged("严格地请打分。", 0.9)
    assert set(rubrics_of(a).values()) == {"请打分。"}
    assert rubrics_of([dict(i, judge="rm:runs/2/final") for i in a]) == {}
    assert paired_deltas(a, b)[0].n == 2
    with pytest.raises(DifferentJudges, match="were judged with different prompts for class 'brainstorming'"):
        paired_deltas(a, edited, "run 1", "run 3")
    rows = [reference_row(), summarize("a", a, 1, "openai:gpt-4o"), summarize("b", b, 2, "openai:gpt-4o"),
            summarize("e", edited, 3, "openai:gpt-4o")]
    assert best_per_column(rows)[MACRO] == {1}  # the edited run's higher mean is on another scale
    assert "a run judged with other class prompts (eval_prompt.json) is on another scale" in render(rows)


def test_pairwise_verdicts_in_both_languages():
    from engine.pairwise import FIRST, SECOND, TIE, parse_verdict

    cases = {"结论: 回答一": FIRST, "理由……\n结论：回答二": SECOND, "结论: 平局": TIE, "**结论:** 回答一": FIRST,
             "Verdict: Answer B": SECOND, "verdict: answer 1": FIRST, "Verdict: tie": TIE, "Winner: A": FIRST,
             "Verdict: a tie": TIE, "Verdict: Both answers are equally good, tie": None,
             "Verdict: Bad answers": None, "no conclusion here": None, "结论: 回答二\n(以上)\n结论: 回答一": FIRST}
    for reply, expected in cases.items():
        assert parse_verdict(reply) == expected, reply


def test_a_pairwise_report_of_no_judged_item_shows_no_rate():
    """Every judge call failed: "0.0% [0.0%, 0.0%]" three times read as a measured result."""
    from engine.pairwise import render, report

    items = [{"item_id": 1, "category": "open_qa", "answer": "x"}]
    text = render(report("run 1", "run 2", items, items, []))
    assert "0 items judged in both orders" in text and "0.0%" not in text
    assert "| - | - | - | - | - | - |" in text
