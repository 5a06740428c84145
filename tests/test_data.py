import json
import logging
from pathlib import Path

import pytest

from engine.config import DataSource
from engine.data import DataError, load_conversations, load_preferences
from engine.data.records import read_records
from engine.template import Turn

Q, A = Turn("user", "q"), Turn("assistant", "a")


def jsonl(path: Path, records: list, raw_lines: dict[int, str] | None = None) -> str:
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    for index, text in (raw_lines or {}).items():
        lines.insert(index, text)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def convs(path: str, **kw) -> list:
    return load_conversations([DataSource(path=path, **kw)]).train


def loaded(loader, *sources, **kw):
    mixture = loader(list(sources), **kw)
    return mixture.train, mixture.reports


def test_alpaca_with_and_without_input(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Translate", "input": "apple", "output": "苹果"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
    ])
    got = sorted(convs(path), key=lambda c: c[0].content)
    assert got == [(Turn("user", "Say hi"), Turn("assistant", "hi")),
                   (Turn("user", "Translate\napple"), Turn("assistant", "苹果"))]


@pytest.mark.parametrize("assistant", ["gpt", "assistant"])
def test_sharegpt_multi_turn(tmp_path, assistant):
    record = {"conversations": [
        {"from": "system", "value": "be nice"},
        {"from": "human", "value": "q1"}, {"from": assistant, "value": "a1"},
        {"from": "human", "value": "q2"}, {"from": assistant, "value": "a2"},
        {"from": "human", "value": "unanswered"},
    ]}
    (conv,) = convs(jsonl(tmp_path / "s.jsonl", [record]))
    assert conv == (Turn("user", "q1"), Turn("assistant", "a1"), Turn("user", "q2"), Turn("assistant", "a2"))
    from engine.data.formats import from_sharegpt

    with pytest.raises(ValueError, match="^no assistant answer: the conversation is a question alone$"):
        from_sharegpt({"conversations": [{"from": "human", "value": "q"}]})  # it said "has no turns"


def test_messages_and_prompt_completion(tmp_path):
    path = jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"prompt": "q", "completion": "a"},
        {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]},
    ])
    assert convs(path) == [(Q, A)] * 3


def test_malformed_lines_are_counted_and_reported_with_line_numbers(tmp_path, caplog):
    path = jsonl(tmp_path / "bad.jsonl", [
        {"instruction": "q", "output": "a"},
        {"instruction": "q"},
        {"messages": [{"role": "assistant", "content": "a"}]},
        *[{"instruction": "q", "output": "a"}] * 3,
    ], raw_lines={1: "{not json", 4: '{"instruction": "q", "output": "a line cut sh'})
    with caplog.at_level(logging.WARNING):
        items, (report,) = loaded(load_conversations, DataSource(path=path))
    assert len(items) == 4 and report.used == 4 and report.malformed == 4
    assert report.examples[0].startswith(f"{path}:2: not valid JSON")
    assert report.examples[1].startswith(f"{path}:3: ")
    assert report.examples[2] == f"{path}:4: turn 1 is from assistant, expected user (turns must alternate)"
    assert f"{path}:2" in caplog.text
    # A line cut short inside a string: it says so, and where the string starts (it said "Invalid control
    # character at, column 56": the line break)
    assert f"{path}:5: not valid JSON (Unterminated string starting at column 32)" in caplog.text


def test_json_array_reports_the_line_of_each_record(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text('[\n  {"instruction": "q", "output": "a"},\n\n  {"instruction": "q"}\n]\n', encoding="utf-8")
    assert [r.where for r in read_records(str(path))] == [f"{path}:2", f"{path}:4"]
    items, (report,) = loaded(load_conversations, DataSource(path=str(path)))
    assert report.examples == [f"{path}:4: missing 'output'"]


def test_a_non_utf8_byte_spoils_only_its_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    good = json.dumps({"instruction": "q", "output": "a"}).encode()
    path.write_bytes(good + b"\n" + b'{"instruction": "caf\xe9", "output": "a"}\n' + good + b"\n")
    items, (report,) = loaded(load_conversations, DataSource(path=str(path)))
    assert len(items) == 2 and report.malformed == 1
    assert report.examples == [f"{path}:2: not UTF-8 (byte 0xe9 at column 21)"]
    array = tmp_path / "latin.json"
    array.write_bytes(b'[\n {"instruction": "q", "output": "a"},\n {"instruction": "caf\xe9", "output": "a"}\n]')
    with pytest.raises(DataError, match=rf"{array}:3: not UTF-8 \(byte 0xe9\)"):
        list(read_records(str(array)))


def test_a_file_in_another_encoding_is_refused_not_half_read(tmp_path):
    """Saved as GBK, a Chinese data set's ASCII records would pass and every other one be skipped."""
    rows = [{"instruction": f"question {i}", "output": "answer"} if i % 2 else
            {"instruction": f"问题 {i}", "output": "好的答案"} for i in range(10)]
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    gbk = tmp_path / "gbk.jsonl"
    gbk.write_bytes(text.encode("gb18030"))
    with pytest.raises(DataError, match=rf"{gbk}:3: not UTF-8, nor is line 1.*reads as GB18030 .*; convert it to "
                                        r"UTF-8 first \(iconv -f GB18030 -t UTF-8\)"):
        loaded(load_conversations, DataSource(path=str(gbk)))
    # Accented Latin letters decode as GB18030 too (one with the letter after it): not called Chinese
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes("".join(json.dumps({"instruction": f"naïve Übersetzung {i}", "output": "größer"},
                                         ensure_ascii=False) + "\n" for i in range(5)).encode("cp1252"))
    with pytest.raises(DataError, match=r"reads as CP1252 .*\(iconv -f CP1252 -t UTF-8\)"):
        loaded(load_conversations, DataSource(path=str(latin)))
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes(text.encode("utf-16"))
    with pytest.raises(DataError, match=rf"{utf16}:1: not UTF-8: it reads as UTF-16"):
        list(read_records(str(utf16)))
    # A UTF-8 file with a damaged line beyond ASCII further on keeps its other records.
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_bytes(text.encode("utf-8") + "问题".encode("gb18030") + b"\n" + "问".encode("gb18030") + b"\n")
    assert sum(raw.error is not None for raw in read_records(str(damaged))) == 2


def test_json_arrays_of_every_shape(tmp_path):
    for text, count in (("[]", 0), ("[ ]\n", 0), ('[{"a": 1}]', 1), ('\ufeff[\n{"a": [1, 2]},\n{"b": "]"}\n]', 2)):
        path = tmp_path / "x.json"
        path.write_text(text, encoding="utf-8")
        assert len(list(read_records(str(path)))) == count, text
    path.write_text('[{"a": 1}\n {"b": 2}]', encoding="utf-8")
    with pytest.raises(DataError, match=r"x.json:2: not valid JSON \(expected ','"):
        list(read_records(str(path)))


def test_belle_style_json_lines_named_json(tmp_path):
    path = jsonl(tmp_path / "belle.json", [{"instruction": "q", "input": "", "output": "a"}])
    assert convs(path) == [(Q, A)]


def test_parquet_and_datasets_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "completion": "a"}] * 3), tmp_path / "p.parquet")
    assert convs(str(tmp_path / "p.parquet")) == [(Q, A)] * 3
    # A folder goes through `datasets.load_dataset`, the same call a hub id takes.
    folder = tmp_path / "ds"
    folder.mkdir()
    jsonl(folder / "train.jsonl", [{"instruction": "q", "output": "a"}] * 2)
    assert convs(str(folder)) == [(Q, A)] * 2


def test_a_source_mostly_of_other_records_is_an_error(tmp_path):
    """Two usable records among 72 of another format (`prompt/response`): the wrong file, not noise to skip;
    refused as a max_length that drops most records is. Fewer than half malformed are skipped."""
    path = jsonl(tmp_path / "mostly.jsonl",
                 [{"instruction": "q", "output": "a"}] * 2 + [{"prompt": "q", "response": "a"}] * 72)
    with pytest.raises(DataError, match=r"mostly.jsonl: 72 of its 74 records are not usable SFT records, more than "
                                        r"half: is it the right file and format\? First problem: .*mostly.jsonl:3: "):
        convs(path)
    assert len(convs(jsonl(tmp_path / "some.jsonl", [{"instruction": "q", "output": "a"}] * 3
                           + [{"prompt": "q", "response": "a"}] * 3))) == 3


def test_a_pair_of_one_answer_twice_is_skipped(tmp_path):
    """chosen == rejected: a zero gradient and a tie in accuracy, in every format."""
    path = jsonl(tmp_path / "p.jsonl", [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"prompt": "q", "chosen": "same", "rejected": "same "},
        {"chosen": "\n\nHuman: q\n\nAssistant: same", "rejected": "\n\nHuman: q\n\nAssistant: same"},
        *[{"prompt": "q", "chosen": "good", "rejected": "bad"}] * 2,
    ])
    pairs, (report,) = loaded(load_preferences, DataSource(path=path))
    assert len(pairs) == 3 and report.malformed == 2
    assert all("chosen and rejected are the same answer" in e for e in report.examples)
    same = jsonl(tmp_path / "same.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}] * 36)
    with pytest.raises(DataError, match="none of its first 20 records is a preference record.*the same answer"):
        load_preferences([DataSource(path=same)])


def test_a_folder_saved_by_datasets_is_read_back_and_checked_before_training(tmp_path, workdir):
    """`save_to_disk` folders (a Dataset, or a DatasetDict by split) load as they were saved; a folder is
    read (streamed, a sample) by the check before anything is registered, as a file is."""
    import datasets

    from engine.config import load_recipe
    from engine.data.check import check_stage_data
    from tests.conftest import TINY

    datasets.Dataset.from_list([{"instruction": "q", "output": "a"}] * 3).save_to_disk(tmp_path / "one")
    assert convs(str(tmp_path / "one")) == [(Q, A)] * 3
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"instruction": "q", "output": "a"}] * 2),
                          "test": datasets.Dataset.from_list([{"instruction": "q", "output": "a"}])}
                         ).save_to_disk(tmp_path / "split")
    assert convs(str(tmp_path / "split")) == [(Q, A)] * 2 and convs(str(tmp_path / "split"), split="test") == [(Q, A)]
    with pytest.raises(DataError, match="no split 'dev' \\(it has train, test\\)"):
        convs(str(tmp_path / "split"), split="dev")

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    jsonl(wrong / "train.jsonl", [{"question": "q", "answer": "a"}] * 30)
    recipe = load_recipe(TINY, [f"sft.data=[{{path: {wrong}}}]"])
    with pytest.raises(DataError, match=r"sft.data.0: .*wrong: none of its first"):
        check_stage_data("sft", recipe)
    check_stage_data("sft", load_recipe(TINY, [f"sft.data=[{{path: {tmp_path / 'one'}}}]", "sft.train.eval_ratio=0"]))


def test_a_source_without_usable_records_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no usable SFT record; first problem: .*:1: missing 'output'"):
        convs(jsonl(tmp_path / "bad.jsonl", [{"instruction": "q"}]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="the source is empty"):
        convs(str(empty))
    with pytest.raises(DataError, match="no such file"):
        convs(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="unsupported file type"):
        (tmp_path / "x.csv").write_text("a\n")
        convs(str(tmp_path / "x.csv"))


def test_declared_format_is_enforced(tmp_path):
    path = jsonl(tmp_path / "m.jsonl", [{"prompt": "q", "completion": "a"}, {"instruction": "q", "output": "a"}])
    items, (report,) = loaded(load_conversations, DataSource(path=path, format="alpaca"))
    assert len(items) == 1 and report.malformed == 1


def test_mixture_weights_and_limit(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [{"instruction": f"a{i}", "output": "x"} for i in range(10)])
    b = jsonl(tmp_path / "b.jsonl", [{"instruction": f"b{i}", "output": "x"} for i in range(10)])
    items, reports = loaded(load_conversations, DataSource(path=a, weight=0.5), DataSource(path=b, weight=2), seed=1)
    names = [c[0].content for c in items]
    assert sum(n.startswith("a") for n in names) == 5 and len(set(n for n in names if n.startswith("a"))) == 5
    assert sum(n.startswith("b") for n in names) == 20 and len(set(n for n in names if n.startswith("b"))) == 10
    assert [r.taken for r in reports] == [5, 20]
    again, _ = loaded(load_conversations, DataSource(path=a, weight=0.5), DataSource(path=b, weight=2), seed=1)
    assert again == items  # the seed fixes the mixture
    assert len(convs(a, limit=3)) == 3


def test_preference_formats(tmp_path):
    path = jsonl(tmp_path / "p.jsonl", [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"chosen": "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant: good",
         "rejected": "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant: bad"},
        {"chosen": "\n\nHuman: q\n\nAssistant: good", "rejected": "\n\nHuman: other\n\nAssistant: bad"},
        {"prompt": [{"role": "user", "content": "q"}],
         "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}]},
    ])
    pairs, (report,) = loaded(load_preferences, DataSource(path=path))
    assert report.malformed == 1 and "do not share the same prompt" in report.examples[0]
    by_len = sorted(pairs, key=lambda p: len(p.prompt))
    assert by_len[0].prompt == (Q,) and (by_len[0].chosen, by_len[0].rejected) == ("good", "bad")
    hh = by_len[-1]
    assert hh.prompt == (Turn("user", "q1"), Turn("assistant", "a1"), Turn("user", "q2"))
    assert (hh.chosen, hh.rejected) == ("good", "bad")


def test_eval_is_held_out_per_source_before_weighting(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [{"instruction": f"a{i}", "output": "x"} for i in range(20)])
    b = jsonl(tmp_path / "b.jsonl", [{"instruction": f"b{i}", "output": "x"} for i in range(10)])
    mixture = load_conversations([DataSource(path=a, weight=3), DataSource(path=b)], seed=0, eval_ratio=0.1)
    held = {c[0].content for c in mixture.eval}
    trained = {c[0].content for c in mixture.train}
    assert len(mixture.eval) == 3 and sum(h.startswith("a") for h in held) == 2  # 10 % of each source
    assert not held & trained  # weighting copies training records only
    assert len(mixture.train) == 18 * 3 + 9
    assert [(r.taken, r.held_out) for r in mixture.reports] == [(54, 2), (9, 1)]
    with pytest.raises(DataError, match="holds out no record"):
        load_conversations([DataSource(path=b)], eval_ratio=0.01)


def test_an_eval_ratio_that_leaves_nothing_to_train_is_refused_by_the_check(tmp_path):
    """As the trainer would find it, but before the run is registered (it was registered, then failed)."""
    from engine.config import load_recipe
    from engine.data.check import check_stage_data
    from tests.conftest import TINY

    b = jsonl(tmp_path / "b.jsonl", [{"instruction": f"b{i}", "output": "x"} for i in range(10)])
    source = f"sft.data=[{{path: {b}}}]"
    with pytest.raises(DataError, match=r"--set sft.train.eval_ratio=0.99: sft.train.eval_ratio=0.99 holds out "
                                        r"every record of .*b.jsonl \(10\): none is left to train on"):
        check_stage_data("sft", load_recipe(TINY, [source, "sft.train.eval_ratio=0.99"]))
    with pytest.raises(DataError, match=r"sft.train.eval_ratio=0.01 holds out no record of 10"):
        check_stage_data("sft", load_recipe(TINY, [source, "sft.train.eval_ratio=0.01"]))
    check_stage_data("sft", load_recipe(TINY, [source, "sft.train.eval_ratio=0.1"]))
    # More records than the check reads: it cannot know, and says nothing (the trainer still does).
    big = jsonl(tmp_path / "big.jsonl", [{"instruction": f"c{i}", "output": "x"} for i in range(300)])
    check_stage_data("sft", load_recipe(TINY, [f"sft.data=[{{path: {big}}}]", "sft.train.eval_ratio=0.001"]))
    # ... unless the source's own limit stops the trainer within what the check reads (it passed, and the run
    # registered, then failed).
    with pytest.raises(DataError, match=r"sft.train.eval_ratio=0.1 holds out no record of 4"):
        check_stage_data("sft", load_recipe(TINY, [f"sft.data=[{{path: {big}, limit: 4}}]"]))
    # A weight that draws no record of a source: the trainer's own refusal, before the run registers.
    with pytest.raises(DataError, match=r": sft.data.1.weight: weight 0.005 selects no record of .*b.jsonl's 9: "
                                        r"raise it"):
        check_stage_data("sft", load_recipe(TINY, [f"sft.data=[{{path: {big}}}, {{path: {b}, weight: 0.005}}]"]))
    with pytest.raises(DataError, match=r"weight 0.005 selects no record of .*b.jsonl's 9"):
        load_conversations([DataSource(path=b, weight=0.005)], eval_ratio=0.1)


def test_a_max_length_that_drops_most_records_says_what_would_be_left():
    """"the run would train on what little is left" was said of a max_length that left nothing."""
    from engine.data.lengths import report

    fates = {"a.jsonl": {"kept": 0, "truncated": 0, "dropped": 4}}
    with pytest.raises(DataError, match=r"drops 4 of 4 conversations .*; nothing would be left to train on$"):
        report(fates, "sft.train.max_length", 12, "conversations")
    fates["b.jsonl"] = {"kept": 1, "truncated": 0, "dropped": 0}  # 4 of 5: still most
    with pytest.raises(DataError, match=r"drops 4 of 5 conversations .*; only 1 of 5 would be left$"):
        report(fates, "sft.train.max_length", 12, "conversations")
    report({"a.jsonl": {"kept": 3, "truncated": 1, "dropped": 1}}, "sft.train.max_length", 12)  # most kept
