"""The chat and score screens, driven by the pilot against real generation workers (two tiny checkpoints,
each in its own process) and a real runs.db."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import threading
import time

import pytest

from console.screens.chat import ChatScreen, ChatSettings, similarity_and_diff
from console.screens.dialogs import ConfirmScreen, SideBySideScreen, TextScreen
from console.screens.scores import ItemsScreen, ScoresScreen
from console.widgets.score_table import ScoreTable
from engine.store import EvalStore, Store
from tests.pilot import console, help_text, sync, wait_for


def two_checkpoints(workdir):
    other = workdir / "other-model"
    shutil.copytree(workdir / "demo" / "model", other)
    return str(workdir / "demo" / "model"), str(other)


async def open_chat(pilot, app, left, right, settings):
    app.push_screen(ChatScreen(left, right, settings))
    await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen.query("#chat-input"), 10,
                   "the chat screen")
    screen = app.screen
    await wait_for(pilot, lambda: all(screen.ready.get(s) for s in screen.sides), 600, "its workers ready")
    return screen


async def ask(pilot, screen, text):
    screen.query_one("#chat-input").focus()
    for ch in text:
        await pilot.press(ch if ch != " " else "space")
    await pilot.press("enter")


@sync
async def test_two_panes_stream_and_a_dead_worker_only_stops_its_own(workdir):
    left, right = two_checkpoints(workdir)
    app = console()
    # Greedy on the tiny model never meets eos: each answer runs to its length, long enough to kill mid-way.
    settings = ChatSettings(temperature=0, max_new_tokens=3000)
    async with app.run_test(size=(100, 32)) as pilot:
        screen = await open_chat(pilot, app, left, right, settings)
        await ask(pilot, screen, "What is 2 plus 3?")
        panes = screen.panes
        await wait_for(pilot, lambda: panes["left"].tokens > 5 and panes["right"].tokens > 5, 60, "tokens on both")
        assert panes["right"].busy
        os.kill(screen.processes["right"].pid, signal.SIGKILL)  # mid-answer
        await wait_for(pilot, lambda: panes["right"].dead, 30, "the right pane to show its worker's death")
        await wait_for(pilot, lambda: not panes["left"].busy, 600, "the left answer to finish")
        assert panes["left"].tokens == 3000 and not panes["left"].dead
        assert "3000 tokens" in str(panes["left"].stats.render()) and "tok/s" in str(panes["left"].stats.render())
        assert "worker exited" in " ".join(str(w.render()) for w in panes["right"].body.query(".pane-error"))
        body = panes["left"].body  # taller than its pane: it follows the newest text
        await wait_for(pilot, lambda: body.max_scroll_y > 0 and body.scroll_y == body.max_scroll_y, 10,
                       "the view at the newest text")
        assert screen.turns["left"][-1]["role"] == "assistant" and len(screen.turns["left"][-1]["content"]) > 100


@sync
async def test_x_stops_both_answers_where_they_are_and_the_conversation_goes_on_from_them(workdir, tmp_path):
    """x ends the answers being written (the local engine hears it between two tokens); what each side wrote
    stays in its conversation, marked stopped, and the next question follows it."""
    from dataclasses import replace

    from console.exports import export_chats

    left, right = two_checkpoints(workdir)
    app = console()
    async with app.run_test(size=(100, 32)) as pilot:
        # Greedy on the tiny model never meets eos: left alone, each answer would run 3000 tokens.
        screen = await open_chat(pilot, app, left, right, ChatSettings(temperature=0, max_new_tokens=3000))
        await ask(pilot, screen, "Tell me a long story.")
        panes = screen.panes
        await wait_for(pilot, lambda: panes["left"].tokens > 5 and panes["right"].tokens > 5, 60, "tokens on both")
        await pilot.press("escape", "x")
        await wait_for(pilot, lambda: not any(p.busy for p in panes.values()), 60, "both answers to stop")
        for side in ("left", "right"):
            stats = str(panes[side].stats.render())
            assert "· stopped" in stats and "3000 tokens" not in stats
            last = screen.turns[side][-1]
            assert last["role"] == "assistant" and last["stopped"] and last["content"] == panes[side].answer != ""
            assert any("stopped: the answer so far is kept" in str(n.render()) for n in panes[side].query(".pane-note"))
        await pilot.press("x")  # nothing is being written: nothing changes
        assert [len(screen.turns[s]) for s in ("left", "right")] == [2, 2]

        screen.settings = replace(screen.settings, max_new_tokens=4)
        await ask(pilot, screen, "Shorter, please.")
        await wait_for(pilot, lambda: all(len(screen.turns[s]) == 4 for s in ("left", "right")), 60,
                       "the next answers")
        assert [t["role"] for t in screen.turns["left"]] == ["user", "assistant", "user", "assistant"]
        assert "stopped" not in screen.turns["left"][-1]
        await pilot.press("escape", "S")
        await wait_for(pilot, lambda: _chats(), 20, "the saved chat")

        # r after a stop: the stopped answer goes, and so does what was said of it; the pane shows what the
        # conversation holds (the stopped answer and its note stayed above the new one).
        screen.settings = replace(screen.settings, max_new_tokens=3000)
        await ask(pilot, screen, "Another long one.")
        await wait_for(pilot, lambda: panes["left"].tokens > 5 and panes["right"].tokens > 5, 60, "tokens on both")
        await pilot.press("ctrl+c")  # from the question box too: a terminal's stop key stops the answers
        await wait_for(pilot, lambda: not any(p.busy for p in panes.values()), 60, "both answers to stop")
        screen.settings = replace(screen.settings, max_new_tokens=4)
        await pilot.press("escape", "r")
        await wait_for(pilot, lambda: not any(p.busy for p in panes.values()) and
                       all("stopped" not in screen.turns[s][-1] for s in ("left", "right")), 60, "the new answers")
        for side in ("left", "right"):
            shown = list(panes[side].body.children)
            last_question = max(k for k, w in enumerate(shown) if w.has_class("user-turn"))
            below = shown[last_question + 1:]
            assert len(below) == 1 and not below[0].has_class("pane-note"), [type(w).__name__ for w in below]
            assert len(screen.turns[side]) == 6
    markdown, _ = export_chats(_chats(), tmp_path / "exports")
    assert markdown.read_text(encoding="utf-8").count("*(stopped)*") == 2


@sync
async def test_same_seed_same_answer_diff_blind_vote_save_and_export(workdir):
    left, right = two_checkpoints(workdir)
    app = console()
    settings = ChatSettings(temperature=0.8, max_new_tokens=24, seed=5)
    async with app.run_test(size=(100, 32)) as pilot:
        screen = await open_chat(pilot, app, left, right, settings)
        await ask(pilot, screen, "Name a colour.")
        await wait_for(pilot, lambda: len(screen.turns["right"]) == 2 and len(screen.turns["left"]) == 2, 60,
                       "both answers")
        # Same weights, same settings and seed: the same answer on both sides, sampled or not.
        assert screen.turns["left"][1] == screen.turns["right"][1]
        def from_the_top(pane) -> bool:  # a short conversation reads from the pane's top
            question = pane.body.children[0]
            return pane.body.scroll_y == 0 and 0 <= question.region.y - pane.body.region.y <= 1

        await wait_for(pilot, lambda: all(from_the_top(p) for p in screen.panes.values()), 10, "the answers in view")
        await pilot.press("escape", "d")
        await wait_for(pilot, lambda: isinstance(app.screen, SideBySideScreen), 10, "the diff")
        assert "left and right: similarity 100.0%" in app.screen.heading
        assert [(name, text.plain) for name, text in app.screen.columns] == [
            ("left", screen.turns["left"][1]["content"]), ("right", screen.turns["right"][1]["content"])]
        await pilot.press("escape")

        # Blind mode starts a new exchange: what is unsaved of this one is not thrown away unasked.
        await pilot.press("m")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), 10, "the question")
        assert "this conversation (1 question) is not saved" in str(app.screen.question)
        await pilot.press("n")  # kept
        await wait_for(pilot, lambda: app.screen is screen, 10, "the chat again")
        assert not screen.blind and screen.questions == ["Name a colour."]
        await pilot.press("S")
        await wait_for(pilot, lambda: len(_chats()) == 1, 20, "the saved exchange")
        stats = {s: str(screen.panes[s].stats.render()) for s in ("left", "right")}
        assert all("tok/s" in line for line in stats.values())
        await pilot.press("m")  # saved: no question; a new exchange, sides shuffled and named A and B
        await wait_for(pilot, lambda: screen.blind, 10, "blind mode")
        # The last answer's figures go with it: they could tell the hidden models apart.
        assert all(str(screen.panes[s].stats.render()) == "ready" for s in ("left", "right"))
        assert screen.blind and {str(screen.panes[s].heading.render()) for s in ("left", "right")} == {"A", "B"}
        await ask(pilot, screen, "Say hello.")
        await wait_for(pilot, lambda: not any(p.busy for p in screen.panes.values()) and screen.questions, 60,
                       "the blind answers")
        await pilot.press("escape", "d")  # before the vote the diff names them A and B, A first
        await wait_for(pilot, lambda: isinstance(app.screen, SideBySideScreen), 10, "the blind diff")
        assert [(name, text.plain) for name, text in app.screen.columns] == [
            (name, screen.panes[screen.shown[name]].answer) for name in ("A", "B")]
        assert "left" not in app.screen.heading and "right" not in app.screen.heading
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is screen, 10, "the chat again")
        await pilot.press("S")  # saved before the vote: the vote then completes that row
        await wait_for(pilot, lambda: len(_chats()) == 2 and screen.saved_as is not None, 20, "the saved exchange")
        await pilot.press("2")  # B is better
        assert screen.voted == "B"
        b_side = screen.shown["B"]
        await wait_for(pilot, lambda: _chats()[-1]["vote"] is not None, 20, "the vote in runs.db")
        assert len(_chats()) == 2  # one exchange, one row
        vote = _chats()[-1]
        assert vote["blind"] == 1 and vote["vote"] == b_side and vote["a_is"] == screen.shown["A"]
        assert json.loads(vote["transcript"])["left"][0]["content"] == "Say hello."
        assert "=" in str(screen.panes[b_side].heading.render())  # revealed after the vote
        await pilot.press("2", "S")
        await wait_for(pilot, lambda: any("saved already" in str(note.message) for note in app._notifications), 10,
                       "S refused")
        assert len(_chats()) == 2  # one vote per exchange, and the vote saved it: no second row

        await pilot.press("n")  # a new chat in blind mode: shuffled anew, names hidden again
        assert {str(screen.panes[s].heading.render()) for s in ("left", "right")} == {"A", "B"}
        await ask(pilot, screen, "Say bye.")  # the next exchange is blind: names hidden
        assert {str(screen.panes[s].heading.render()) for s in ("left", "right")} == {"A", "B"}
        assert screen.turns["left"][0]["content"] == "Say bye."
        await wait_for(pilot, lambda: not any(p.busy for p in screen.panes.values()) and
                       len(screen.turns["right"]) == 2, 60, "the second blind answers")
        await pilot.press("escape", "1")
        await wait_for(pilot, lambda: len(_chats()) == 3, 20, "the second vote")
        second = _chats()[-1]
        assert second["vote"] == second["a_is"] == screen.shown["A"]
        assert json.loads(second["transcript"])["right"][0]["content"] == "Say bye."

        await pilot.press("r")  # answers made again after the vote are in no saved row
        await wait_for(pilot, lambda: not any(p.busy for p in screen.panes.values()) and
                       len(screen.turns["right"]) == 2 and screen.unsaved, 60, "the answers made again")
        await ask(pilot, screen, "And again?")  # a new blind exchange would lose them: asked first
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), 10, "the question")
        assert "a new question after the vote starts a new blind exchange" in str(app.screen.question)
        await pilot.press("n")  # kept: the question waits in the box
        await wait_for(pilot, lambda: app.screen is screen, 10, "the chat again")
        assert screen.questions == ["Say bye."] and screen.query_one("#chat-input").text == "And again?"
        screen.query_one("#chat-input").focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), 10, "the question again")
        await pilot.press("y")  # after a vote: a new blind exchange, unsaved until S
        await wait_for(pilot, lambda: not any(p.busy for p in screen.panes.values()) and
                       len(screen.turns["right"]) == 2, 60, "the answers after the vote")
        assert screen.turns["right"][0]["content"] == "And again?"
        await pilot.press("escape", "S")
        await wait_for(pilot, lambda: len(_chats()) == 4, 20, "the saved exchange")
        await pilot.press("E")
        exports = workdir / "exports"
        await wait_for(pilot, lambda: (exports / "chats.jsonl").is_file(), 20, "the export")
        lines = (exports / "chats.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(lines) == 4 and json.loads(lines[1])["transcript"]["right"][0]["content"] == "Say hello."
        assert (exports / "chats.jsonl").stat().st_mode & 0o077 == 0  # for its owner only
        assert "Say hello." in (exports / "chats.md").read_text(encoding="utf-8")


@sync
async def test_a_side_that_cannot_start_fails_alone_and_a_new_key_variable_restarts_an_endpoint(workdir,
                                                                                               monkeypatch):
    from tests.judge_server import JudgeServer

    monkeypatch.delenv("UNSET_KEY", raising=False)
    server = JudgeServer(lambda body, index: ("reply", "endpoint answer"))
    try:
        app = console()
        async with app.run_test(size=(100, 32)) as pilot:
            app.push_screen(ChatScreen("/nope/model", str(workdir / "demo" / "model"), ChatSettings(
                temperature=0, max_new_tokens=8)))
            await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen), 10, "the chat screen")
            screen = app.screen
            await wait_for(pilot, lambda: screen.ready.get("right"), 600, "the right worker, alone")
            assert screen.panes["left"].dead
            errors = " ".join(str(w.render()) for w in screen.panes["left"].body.query(".pane-error"))
            assert "is not a folder" in errors
            await ask(pilot, screen, "Hello?")
            await wait_for(pilot, lambda: len(screen.turns["right"]) == 2, 60, "the right side's answer")
            app.pop_screen()

            app.push_screen(ChatScreen(f"openai:served@{server.url}", None, ChatSettings(key_env="UNSET_KEY")))
            await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen), 10, "the endpoint chat")
            screen = app.screen
            await wait_for(pilot, lambda: screen.panes["left"].dead, 60, "the missing key")
            assert "UNSET_KEY" in " ".join(str(w.render()) for w in screen.panes["left"].body.query(".pane-error"))
            await pilot.press("escape", "o")
            await wait_for(pilot, lambda: app.screen.query("#set-key_env"), 10, "the settings")
            app.screen.query_one("#set-key_env").value = ""  # a local endpoint without a key
            await pilot.press("enter")
            await wait_for(pilot, lambda: screen.ready.get("left") and not screen.panes["left"].dead, 60,
                           "the endpoint worker started again")
            await ask(pilot, screen, "Hello?")
            await wait_for(pilot, lambda: len(screen.turns["left"]) == 2, 60, "the endpoint's answer")
            assert screen.turns["left"][1]["content"] == "endpoint answer"
    finally:
        server.close()


def _chats():
    with Store(os.environ["RLHF_DB"]) as store:
        return EvalStore(store).chats()


def test_character_diff_works_for_chinese():
    ratio, left, right = similarity_and_diff("今天天气很好\n第二行", "今天天气不好\n第二行")
    assert 0.8 < ratio < 0.95
    # Each side reads as it was written, line breaks kept; what only it says is marked on it alone.
    assert (left.plain, right.plain) == ("今天天气很好\n第二行", "今天天气不好\n第二行")
    assert [(left.plain[s.start:s.end], str(s.style)) for s in left.spans] == [("很", "strike red")]
    assert [(right.plain[s.start:s.end], str(s.style)) for s in right.spans] == [("不", "underline bold green")]


def _fake_eval_run(store, name, scores, ask="q", n=36):
    run_id = store.create_run(stage="eval", name=name, recipe="", config="{}")
    evals = EvalStore(store)
    from engine.belle import CATEGORIES
    from engine.judge import Verdict

    items = [{"item_id": k, "category": CATEGORIES[k % 9], "class": CATEGORIES[k % 9], "question": f"{ask}{k}",
              "reference": f"r{k}"} for k in range(n)]
    evals.add_items(run_id, items)
    evals.set_answers(run_id, [(k, f"answer {k}", 3, "eos") for k in range(n)])
    for k in range(n):
        evals.set_judgment(run_id, k, "judge", Verdict(scores(k), "scored", f"得分: {scores(k)}"))
    store.update_run(run_id, status="done")
    return run_id


async def open_scores(pilot, app, rows: int) -> ScoreTable:
    """The score screen over the runs, once its table has `rows` rows (the published one counted)."""
    app.push_screen(ScoresScreen())
    await wait_for(pilot, lambda: isinstance(app.screen, ScoresScreen) and app.screen.query(ScoreTable), 10,
                   "the score screen")
    table = app.screen.query_one(ScoreTable)
    await wait_for(pilot, lambda: table.row_count == rows, 30, "the rows")
    return table


@sync
async def test_the_score_screen_marks_the_best_and_drills_into_a_cell(workdir):
    with Store(os.environ["RLHF_DB"]) as store:
        _fake_eval_run(store, "base", lambda k: 0.5)
        _fake_eval_run(store, "ppo", lambda k: 0.8 if k % 9 == 1 else 0.4)
        _fake_eval_run(store, "another eval set", lambda k: 0.1, ask="other question ")
        _fake_eval_run(store, "three questions", lambda k: 0.3, ask="few ", n=3)  # of 3 categories of 9
    app = console()
    async with app.run_test(size=(120, 30)) as pilot:
        table = await open_scores(pilot, app, rows=5)
        rewrite = table.get_row_at(2)[2]  # the ppo row's rewrite column: its best
        assert rewrite.plain == "0.800" and "bold" in str(rewrite.style)
        assert "bold" not in str(table.get_row_at(1)[2].style)
        table.move_cursor(row=2, column=2)
        await wait_for(pilot, lambda: "rewrite: 0.800 [0.800, 0.800] · n 4" in
                       str(app.screen.query_one("#cell-info").render()), 20, "the cell's line")
        # Back on the model column: the row's line, not the cell last visited's
        table.move_cursor(row=1, column=0)
        await wait_for(pilot, lambda: str(app.screen.query_one("#cell-info").render()).startswith(
            f"run {table.rows_data[1].run_id} · base"), 20, "the row's line")
        # with how long its answers were, and how many the token limit cut
        assert str(app.screen.query_one("#cell-info").render()).endswith(
            "· judge · answers 3 tokens on average, 0 of 36 cut at the token limit")
        # A macro over categories a run's questions leave out: no score will come, not "no score yet"
        from engine.scores import COLUMNS, MACRO

        table.move_cursor(row=4, column=COLUMNS.index(MACRO) + 1)
        await wait_for(pilot, lambda: f"{MACRO}: none (a macro needs a score in every category" in
                       str(app.screen.query_one("#cell-info").render()), 20, "why the macro has none")
        table.move_cursor(row=2, column=2)
        await wait_for(pilot, lambda: "rewrite: 0.800" in str(app.screen.query_one("#cell-info").render()), 20)
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ItemsScreen), 20, "the cell's items")
        assert len(app.screen.items) == 4 and all(i["category"] == "rewrite" for i in app.screen.items)
        await wait_for(pilot, lambda: "question: q1" in str(app.screen.query_one("#item-text").render()), 20,
                       "the first item")
        assert "judge: 得分: 0.8" in str(app.screen.query_one("#item-text").render())

        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, ScoresScreen), 10, "the score screen again")
        table.move_cursor(row=2, column=0)  # on the model's name: every item of its run (it did nothing)
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ItemsScreen), 20, "the run's items")
        assert len(app.screen.items) == 36 and "every class · 36 items" in app.screen.heading

        await pilot.press("escape")  # paired deltas: ppo against base, then against a run of other questions
        await wait_for(pilot, lambda: isinstance(app.screen, ScoresScreen), 10, "the score screen again")
        table.move_cursor(row=1, column=0)  # the name column marks the row too
        await pilot.press("space")
        assert table.get_row_at(1)[0].plain.startswith("▸ 1 base")
        table.move_cursor(row=2, column=0)
        await pilot.press("p")
        await wait_for(pilot, lambda: isinstance(app.screen, TextScreen), 20, "the paired deltas")
        assert app.screen.heading.startswith("run 2 minus run 1")
        assert "macro: -0.056" in str(app.screen.body) and "n 36" in str(app.screen.body)
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, ScoresScreen), 10, "the score screen again")
        # Two rows marked (as the run table's diff takes them): p compares them wherever the cursor is; a
        # second mark used to move the first away, and p then asked for what had just been done.
        table.move_cursor(row=3, column=0)
        await pilot.press("space")
        assert table.get_row_at(1)[0].plain.startswith("▸ 1 base") and table.get_row_at(3)[0].plain.startswith("▸ ")
        table.move_cursor(row=0, column=0)  # the published row
        await pilot.press("p")
        await wait_for(pilot, lambda: any("hold different questions" in str(n.message) for n in app._notifications),
                       20, "the refusal")
        assert isinstance(app.screen, ScoresScreen)
        table.move_cursor(row=3, column=0)
        await pilot.press("space")  # unmarked again: one mark, the cursor's row against it
        assert table.marked == [1]

        with Store(os.environ["RLHF_DB"]) as store:  # an evaluation ends meanwhile: the table shows it unasked
            _fake_eval_run(store, "late", lambda k: 0.2)
        await wait_for(pilot, lambda: table.row_count == 5, 30, "the new run's row")
        assert table.get_row_at(1)[0].plain.startswith("▸ 1 base")  # the mark stays
        assert table.cursor_coordinate.row == 3  # and the cursor on its run


@sync
async def test_a_long_run_name_takes_the_width_the_scores_leave(workdir):
    name = "ppo-from-sft-lr1e-6-kl0.02-hydra-k2-seed3"
    with Store(os.environ["RLHF_DB"]) as store:
        _fake_eval_run(store, name, lambda k: 0.5)
    app = console()
    async with app.run_test(size=(200, 30)) as pilot:
        table = await open_scores(pilot, app, rows=2)

        def shown(row: int) -> str:
            return "".join(segment.text for segment in table.render_line(row + 1))  # below the header

        await wait_for(pilot, lambda: f"1 {name}" in shown(1), 10, "the whole name at 200 columns")
        assert "0.500" in shown(1)
        await pilot.resize_terminal(100, 30)  # no room: the scores keep theirs and the name is cut
        await wait_for(pilot, lambda: table.columns[ScoreTable.model_key].width == 22 and f"1 {name}" not in shown(1),
                       10, "the narrow column")
        assert "1 ppo-from-sft" in shown(1)
        table.move_cursor(row=1, column=0)
        await pilot.press("space")  # marked: "▸ " before the name, which fits still at 200 columns
        await pilot.resize_terminal(200, 30)
        await wait_for(pilot, lambda: f"▸ 1 {name}" in shown(1), 10, "the whole marked name")


@sync
async def test_the_score_table_exports_and_says_why_it_cannot(workdir):
    """`e` writes scores.md and scores.csv beside runs.db for their owner; where it cannot (here `exports`
    is a file) it says so: the export failed silently in a screen worker whose error nobody heard."""
    with Store(os.environ["RLHF_DB"]) as store:
        _fake_eval_run(store, "base", lambda k: 0.5)
    exports = workdir / "exports"
    exports.write_text("not a folder")
    app = console()
    async with app.run_test(size=(120, 30)) as pilot:
        await open_scores(pilot, app, rows=2)
        await pilot.press("e")
        await wait_for(pilot, lambda: any(n.title == "export scores failed" for n in app._notifications), 20,
                       "the failure said")
        failure = next(n for n in app._notifications if n.title == "export scores failed")
        assert str(failure.message) == f"cannot export into {exports}: it is a file, not a folder"
        assert exports.read_text() == "not a folder"
        exports.unlink()
        await pilot.press("e")
        await wait_for(pilot, lambda: (exports / "scores.csv").is_file(), 20, "the export")
        assert "| base (evaluation run 1) | 0.500" in (exports / "scores.md").read_text(encoding="utf-8")
        assert (exports / "scores.csv").stat().st_mode & 0o077 == 0  # for its owner only


@sync
async def test_a_screen_workers_unexpected_failure_is_said():
    """Textual tells a worker's failure only to the screen that started it: a screen of the console says it
    (the app's own handler never heard a screen's workers)."""
    from textual import work
    from textual.app import App
    from textual.screen import Screen

    from console.worker_failures import SaysWorkerFailures

    class Failing(SaysWorkerFailures, Screen):
        def on_mount(self) -> None:
            self.fail()

        @work(thread=True, exit_on_error=False, name="scores")
        def fail(self) -> None:
            raise sqlite3.OperationalError("disk I/O error")

    class Host(App):
        def on_mount(self) -> None:
            self.push_screen(Failing())

    app = Host()
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app._notifications, 10, "the failure said")
        [said] = list(app._notifications)
        assert said.title == "scores failed" and str(said.message) == "OperationalError: disk I/O error"
        assert app.is_running


@sync
async def test_rlhf_chats_q_goes_back_to_the_shell_and_its_help_lists_no_shadowed_key(workdir):
    """`rlhf chat` opens the chat over the console: q ends it (it went to the run table, a second q to quit);
    help on the chat does not list the app's q and n as working everywhere (the chat takes both)."""
    from console.screens.help import HelpScreen

    app = console(chat=("openai:m@http://127.0.0.1:9/v1", None, ""))
    async with app.run_test(size=(100, 32)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen), 20, "the chat")
        await pilot.press("escape", "question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), 10, "help")
        text = help_text(app)
        everywhere = text.split("\n\n", 1)[0]
        assert everywhere.startswith("Everywhere") and "Quit" not in everywhere and "New run" not in everywhere
        assert "Help" in everywhere
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen), 10, "the chat again")
        await pilot.press("q")
        await wait_for(pilot, lambda: not app.is_running, 20, "the console to end")


@sync
async def test_the_chats_footer_fits_80_columns_and_help_has_the_full_words(workdir):
    """At 80 columns the footer cut Save and Back (and Help) off: its keys fit before the palette's, and the
    keys it leaves out, and the short words it uses, are in help in full."""
    from textual.widgets._footer import FooterKey

    from console.screens.help import HelpScreen

    app = console(chat=("openai:m@http://127.0.0.1:9/v1", None, ""))
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen), 20, "the chat")
        await pilot.press("escape")  # out of the question box: the screen's keys
        await wait_for(pilot, lambda: any(k.region.width > 0 and k.description == "Back"
                                          for k in app.screen.query(FooterKey)), 10, "the footer drawn")
        keys = list(app.screen.query(FooterKey))
        palette = [k for k in keys if k.has_class("-command-palette")]
        edge = palette[0].region.x if palette else 80
        shown = {k.description for k in keys if not k.has_class("-command-palette")}
        assert {"Regen", "Stop", "Save", "Back", "Help"} <= shown
        assert all(k.region.right <= edge for k in keys if not k.has_class("-command-palette"))
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), 10, "help")
        text = help_text(app)
        for words in ("Regenerate", "Stop answers", "Diff", "Type", "GPUs"):
            assert words in text


@sync
async def test_a_panes_long_title_is_cut_at_its_end_not_wrapped_away():
    """At 80 columns a pane is ~40 wide: its title showed 'right:' alone (the label wrapped to a hidden line)."""
    from textual.app import App

    from console.widgets.chat_pane import ChatPane

    class Host(App):
        def compose(self):
            yield ChatPane("right")

    app = Host()
    async with app.run_test(size=(40, 10)) as pilot:
        pane = app.query_one(ChatPane)
        pane.set_title("right: served@http://127.0.0.1:18080/v1/a/long/path")
        pane.set_stats("12.0 tok/s · 100 tokens · eos · TTFT 0.05 s and more words")
        await pilot.pause()
        title = "".join(segment.text for segment in pane.heading.render_line(0))
        stats = "".join(segment.text for segment in pane.stats.render_line(0))
    assert title.strip().startswith("right: served@http://127.0.0.1") and title.strip().endswith("…")
    assert stats.strip().startswith("12.0 tok/s · 100 tokens") and stats.strip().endswith("…")


def test_streaming_text_rewraps_only_its_last_line():
    from console.widgets.stream_text import StreamText

    text = StreamText()
    text._width = 20
    for k in range(2000):
        text.append("word " * 3 + ("\n" if k % 50 == 49 else ""))
    lines = list(text._lines)
    assert len(lines) > 1000 and all(len(line) <= 20 for line in lines)
    text.append("tail 一二三四五六七八九十")  # CJK counts two cells a character
    assert all(a is b for a, b in zip(lines[:-1], text._lines))  # every earlier line untouched, same objects
    from rich.cells import cell_len

    assert all(cell_len(line) <= 20 for line in text._lines[-3:])
    from console.widgets.stream_text import _split

    assert _split("中文字", 1) == ["中", "文", "字"]  # wider than the line: one a line, never a hang
    assert "".join(text._lines).replace(" ", "") == text.text.replace("\n", "").replace(" ", "")


@sync
async def test_an_endpoint_beside_a_local_model_and_a_blind_vote_on_a_belle_question(workdir, monkeypatch):
    from tests.judge_server import JudgeServer
    from tests.test_eval import write_sample

    monkeypatch.setenv("CHAT_KEY", "sk-chat-secret")
    write_sample(workdir / "belle", per_class=1)
    with Store(os.environ["RLHF_DB"]) as store:  # an evaluation run names the eval folder the chat draws from
        run_id = store.create_run(stage="eval", name="e", recipe="",
                                  config=json.dumps({"eval_dir": str(workdir / "belle")}))
        store.update_run(run_id, status="done")
    server = JudgeServer(lambda body, index: ("reply", "你好，世界！这是端点的回答。"))
    try:
        app = console()
        async with app.run_test(size=(100, 32)) as pilot:
            screen = await open_chat(pilot, app, f"openai:served@{server.url}", str(workdir / "demo" / "model"),
                                     ChatSettings(temperature=0, max_new_tokens=16, key_env="CHAT_KEY"))
            await pilot.press("escape", "m", "Q")  # keys, not typing: blind mode, then a BELLE question
            box = screen.query_one("#chat-input")
            await wait_for(pilot, lambda: box.text.startswith("What is"), 20, "a BELLE question in the input")
            await pilot.press("enter")
            await wait_for(pilot, lambda: all(len(screen.turns[s]) == 2 for s in ("left", "right")), 60,
                           "both answers")
            assert screen.turns["left"][1]["content"] == "你好，世界！这是端点的回答。"  # streamed in pieces
            assert server.calls[0]["stream"] is True and server.keys_seen[0] == "Bearer sk-chat-secret"
            await pilot.press("escape", "3")  # a tie
            await wait_for(pilot, lambda: _chats(), 20, "the vote")
            vote = _chats()[-1]
            assert vote["vote"] == "tie" and vote["item_id"] == screen.item[0] and vote["category"] == screen.item[1]
            assert vote["left_model"] == f"served@{server.url}"
    finally:
        server.close()
    assert "sk-chat-secret" not in (workdir / "runs.db").read_bytes().decode("latin-1")


@sync
async def test_a_cut_stream_is_not_an_answer_and_each_answer_keeps_its_sampling(workdir):
    """An endpoint that closes the stream mid-answer (no finish reason, no [DONE]) is said, and its text is
    not sent back as an answer (it showed as a finished answer, "eos"); the unanswered question is not sent
    again with the next one; a saved chat records the sampling each answer was made with (it recorded the
    settings in force at the save)."""
    from dataclasses import replace

    from tests.judge_server import JudgeServer

    cutting = JudgeServer(lambda body, index: ("cut", "半句话") if index == 0 else ("reply", f"answer {index}"))
    steady = JudgeServer(lambda body, index: ("reply", f"steady {index}"))
    try:
        app = console()
        async with app.run_test(size=(120, 32)) as pilot:
            screen = await open_chat(pilot, app, f"openai:cut@{cutting.url}", f"openai:ok@{steady.url}",
                                     ChatSettings(temperature=0, max_new_tokens=64, key_env=""))
            left = screen.panes["left"]
            await ask(pilot, screen, "first")
            await wait_for(pilot, lambda: not any(p.busy for p in screen.panes.values()), 30, "both ends")
            assert "· cut" in str(left.query_one(".pane-stats").render())
            assert any("ended the stream before the answer did" in str(n.render()) for n in left.query(".pane-note"))
            assert screen.turns["left"] == [{"role": "user", "content": "first"}]
            assert screen.turns["right"][-1]["content"] == "steady 0"

            screen.settings = replace(screen.settings, temperature=0.5)
            await ask(pilot, screen, "second")
            await wait_for(pilot, lambda: len(screen.turns["left"]) == 2 and len(screen.turns["right"]) == 4, 30,
                           "the second answers")
            assert cutting.calls[1]["messages"] == [{"role": "user", "content": "second"}]
            assert [m["content"] for m in steady.calls[1]["messages"]] == ["first", "steady 0", "second"]
            # The two conversations parted there: said when it happened, not found in the saved transcript.
            assert any(str(note.message).startswith("left has no answer to the last question")
                       for note in app._notifications)
            await pilot.press("escape", "S")
            await wait_for(pilot, lambda: _chats(), 20, "the saved chat")
        transcript = json.loads(_chats()[-1]["transcript"])
        assert [t["sampling"]["temperature"] for t in transcript["right"] if t["role"] == "assistant"] == [0, 0.5]
        assert [t["content"] for t in transcript["left"]] == ["second", "answer 1"]
    finally:
        cutting.close()
        steady.close()


@sync
async def test_an_empty_answer_is_said_and_an_answer_sent_whole_shows_no_rate(workdir):
    """A model that ends its answer at once (its end-of-text first) left a blank pane: a display fault or an
    answer still coming, to the eye. The pane says it; the empty answer is the conversation's all the same.
    An endpoint that sends a streamed answer whole showed a decode rate of its arrival (thousands of tok/s)."""
    from tests.judge_server import JudgeServer

    mute = JudgeServer(lambda body, index: ("reply", ""))
    talks = JudgeServer(lambda body, index: ("whole", "something"))
    try:
        app = console()
        async with app.run_test(size=(120, 32)) as pilot:
            screen = await open_chat(pilot, app, f"openai:mute@{mute.url}", f"openai:talks@{talks.url}",
                                     ChatSettings(temperature=0, max_new_tokens=16, key_env=""))
            await ask(pilot, screen, "hello")
            await wait_for(pilot, lambda: not any(p.busy for p in screen.panes.values()), 30, "both ends")
            notes = {side: [str(n.render()) for n in pane.query(".pane-note")] for side, pane in screen.panes.items()}
            assert notes["left"] == ["an empty answer: the model ended it at once"]
            assert notes["right"] == []
            assert screen.turns["left"][-1]["content"] == "" and screen.turns["right"][-1]["content"] == "something"
            stats = str(screen.panes["right"].stats.render())
            assert re.match(r"one piece in \d+\.\d\d s · 9 tokens · eos", stats.strip()), stats
            assert "tok/s" not in stats
    finally:
        mute.close()
        talks.close()


@sync
async def test_an_evaluation_stopped_from_the_console_resumes_from_it(workdir, monkeypatch):
    """x then r on an evaluation run: it stops after the work in hand and goes on, detached, where it
    stopped; its log is in its folder."""
    import subprocess
    import threading

    from console.screens.dialogs import ConfirmScreen
    from tests.conftest import RLHF
    from tests.judge_server import JudgeServer, hanging_at
    from tests.test_eval import KEY, judge_args, write_sample

    n = write_sample(workdir / "belle", per_class=1)
    release = threading.Event()
    server = JudgeServer(hanging_at(2, release))  # the third call hangs while the run is stopped
    env = {**os.environ, "THE_JUDGE_KEY": KEY}
    proc = subprocess.Popen([*RLHF, "eval", "belle", "demo/model", "--eval-dir", "belle", *judge_args(server)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        monkeypatch.setenv("THE_JUDGE_KEY", KEY)  # the console's environment is what a resumed run inherits
        app = console()
        async with app.run_test(size=(100, 32)) as pilot:
            await wait_for(pilot, lambda: len(server.calls) >= 3 and app.runs.get(1, {}).get("status") == "running",
                           180, "the evaluation judging")
            home = app.home
            home.select_run(1)
            await pilot.press("x")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), 10, "the stop dialog")
            assert "every stored answer and verdict kept" in str(app.screen.query_one(".question").render())
            await pilot.press("y")
            release.set()
            await wait_for(pilot, lambda: app.runs[1]["status"] == "stopped", 120, "the stop")
            assert proc.wait(timeout=60) == 143
            monkeypatch.delenv("THE_JUDGE_KEY")  # set in another shell, not the console's: said, nothing started
            await pilot.press("r")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), 10, "the resume dialog")
            await pilot.press("y")
            await wait_for(pilot, lambda: any("reads its key from $THE_JUDGE_KEY, which the console's environment "
                                              "lacks" in str(note.message) for note in app._notifications), 30,
                           "why it cannot resume from here")
            assert app.runs[1]["status"] == "stopped"
            monkeypatch.setenv("THE_JUDGE_KEY", KEY)
            server.models = ["gpt-4o"]  # its list lacks the judge's model now: a warning, which the console says
            await pilot.press("r")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), 10, "the resume dialog")
            await pilot.press("y")
            await wait_for(pilot, lambda: any("does not list it" in str(note.message) and note.severity == "warning"
                                              for note in app._notifications), 60, "the judge's warning")
            await wait_for(pilot, lambda: app.runs[1]["status"] == "done", 180, "the resumed evaluation")
        with Store(os.environ["RLHF_DB"]) as store:
            assert len(EvalStore(store).judgments(1)) == n
            run = store.run(1)
        log = (workdir / "runs" / "1" / "train.log").read_text(encoding="utf-8")
        # The first stretch's plan and the resumed one's ("1 call to make" where one is left)
        assert len(re.findall(r"judge: \d+ calls? to make", log)) == 2, log
        assert log.count("its calls may fail") == 1  # the resumed process's own look, in its log
        # The resumed process's output is in the log from its first line, before its run takes the log over
        # (and once: never both written there and copied there).
        assert log.count("items scorable") == 1
    finally:
        release.set()
        server.close()
        if proc.poll() is None:
            proc.kill()
        with Store(os.environ["RLHF_DB"]) as store:  # the resumed run, detached: never left behind
            row = store.run(1) if store.runs() else {}
        if row.get("status") in ("pending", "running") and row.get("pid"):
            try:
                os.kill(row["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert run["exit_code"] == 0


def test_a_chat_worker_ends_with_the_console_that_started_it_even_killed():
    """A console killed with -9 asks its workers nothing, and a worker blocked in a slow endpoint call would
    not hear it anyway: the kernel ends the worker with its parent. Here the worker's stdin stays open (the
    test holds its other end), so only that can end it."""
    import subprocess
    import sys
    import time

    from engine.chat_worker import PARENT_ENV
    from engine.procs import process_alive

    read, write = os.pipe()
    starter = ("import os, subprocess, sys, time\n"
               f"env = dict(os.environ, {PARENT_ENV}=str(os.getpid()))\n"
               "worker = subprocess.Popen([sys.executable, '-m', 'engine.chat_worker', '--endpoint',\n"
               "                           'http://127.0.0.1:9/v1', '--endpoint-model', 'm', '--key-env', ''],\n"
               f"                          stdin={read}, stdout=subprocess.PIPE, env=env)\n"
               "print(worker.pid, flush=True)\nprint(worker.stdout.readline().decode(), end='', flush=True)\n"
               "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True, pass_fds=[read])
    os.close(read)
    worker = None
    try:
        worker = int(parent.stdout.readline())
        assert '"event": "ready"' in parent.stdout.readline()  # serving, its stdin open
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process_alive(worker, None):
            time.sleep(0.05)
        assert not process_alive(worker, None)
    finally:
        os.close(write)
        parent.kill()
        if worker is not None and process_alive(worker, None):
            os.kill(worker, signal.SIGKILL)


@pytest.mark.parametrize("refuses_usage", [False, True])
def test_an_endpoint_answer_counts_the_tokens_and_the_finish_its_server_reports(refuses_usage):
    """The usage chunk gives the true count (the server streams three tokens a chunk); a server that refuses
    `stream_options` is asked again without it and its chunks are counted. Why it stopped is the server's."""
    import subprocess
    import sys

    from tests.judge_server import JudgeServer

    server = JudgeServer(lambda body, index: ("reply", "abcdefghij"), refuses_stream_options=refuses_usage)
    worker = subprocess.Popen([sys.executable, "-m", "engine.chat_worker", "--endpoint", server.url,
                               "--endpoint-model", "m", "--key-env", ""],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(worker.stdout.readline())["event"] == "ready"
        done = {}
        for rid, length in ((1, 64), (2, 4)):
            worker.stdin.write(json.dumps({"op": "generate", "id": rid,
                                           "messages": [{"role": "user", "content": "hi"}],
                                           "sampling": {"temperature": 0.0, "top_p": 1.0, "top_k": 0,
                                                        "max_new_tokens": length, "seed": 0}}) + "\n")
            worker.stdin.flush()
            while (event := json.loads(worker.stdout.readline()))["event"] == "token":
                pass
            done[rid] = event
    finally:
        worker.stdin.close()
        worker.wait(30)
        server.close()
    assert done[1]["text"] == "abcdefghij" and done[1]["finish"] == "eos"
    assert done[2]["text"] == "abcd" and done[2]["finish"] == "length"
    if refuses_usage:
        assert (done[1]["tokens"], done[2]["tokens"]) == (4, 2)  # chunks: all the worker can count
        assert [("stream_options" in call) for call in server.calls] == [True, False, False]  # asked once
    else:
        assert (done[1]["tokens"], done[2]["tokens"]) == (10, 4)


def test_a_stop_ends_an_endpoint_answer_before_its_server_sends_anything():
    """A server that sends nothing for minutes (a queue before the first token): the cancel ends the answer
    while the server still holds the call, and the next question is answered."""
    import subprocess
    import sys

    from tests.judge_server import JudgeServer

    release, waits = threading.Event(), []

    def script(body: dict, index: int) -> tuple:
        if index == 0:
            waits.append(release.wait(120))  # False: the cancel waited for the server
        return ("reply", "abcdef")

    server = JudgeServer(script)
    worker = subprocess.Popen([sys.executable, "-m", "engine.chat_worker", "--endpoint", server.url,
                               "--endpoint-model", "m", "--key-env", ""],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(rid: int) -> None:
        worker.stdin.write(json.dumps({"op": "generate", "id": rid, "messages": [{"role": "user", "content": "hi"}],
                                       "sampling": {"temperature": 0.0, "top_p": 1.0, "top_k": 0,
                                                    "max_new_tokens": 64, "seed": 0}}) + "\n")
        worker.stdin.flush()

    try:
        assert json.loads(worker.stdout.readline())["event"] == "ready"
        ask(1)
        deadline = time.monotonic() + 60
        while not server.calls:  # the call is at the server, which holds it
            assert time.monotonic() < deadline, "the call never reached the server"
            time.sleep(0.02)
        worker.stdin.write(json.dumps({"op": "cancel", "id": 1}) + "\n")
        worker.stdin.flush()
        stopped = json.loads(worker.stdout.readline())
        release.set()
        assert (stopped["event"], stopped["id"], stopped["finish"], stopped["text"]) == ("done", 1, "cancelled", "")
        ask(2)
        while (event := json.loads(worker.stdout.readline()))["event"] == "token":
            pass
        assert (event["id"], event["text"], event["finish"]) == (2, "abcdef", "eos")
    finally:
        release.set()
        worker.stdin.close()
        worker.wait(30)
        server.close()
    assert waits == [True]


def test_an_endpoints_worker_never_imports_torch():
    """An endpoint's answer needs no torch: importing it with the first answer was that answer's time to
    first token (2-3 s against 0.05 s), and a stream cut short says so."""
    import subprocess
    import sys

    from tests.conftest import REPO
    from tests.judge_server import JudgeServer

    server = JudgeServer(lambda body, index: ("cut", "abcdefg"))
    code = ("import sys\nfrom engine.chat_worker import EndpointModel\n"
            f"model = EndpointModel({server.url!r}, 'm', '')\n"
            "sampling = dict(temperature=0.0, top_p=1.0, max_new_tokens=8, seed=0)\n"
            "pieces = list(model.answer([], sampling, lambda: False))\n"
            "print(pieces[-1].text, pieces[-1].finish, 'torch' in sys.modules)")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    finally:
        server.close()
    assert done.stdout.split() == ["abcdefg", "cut", "False"], done.stderr


def test_an_endpoint_that_answers_a_stream_with_one_whole_reply_gives_that_answer():
    """Some servers and proxies ignore stream=true and send the whole completion as JSON: the answer is
    complete (its finish reason and token count are in it), not a stream cut before it began."""
    from engine.chat_worker import EndpointModel
    from engine.template import Turn
    from tests.judge_server import JudgeServer

    server = JudgeServer(lambda body, index: ("whole", "整个回答，一次给出。"))
    try:
        model = EndpointModel(server.url, "m", "")
        pieces = list(model.answer([Turn("user", "你好")], dict(temperature=0.0, top_p=1.0, max_new_tokens=64, seed=0),
                                   lambda: False))
    finally:
        server.close()
    assert server.calls[-1]["stream"] is True
    last = pieces[-1]
    assert (last.text, last.finish, last.tokens) == ("整个回答，一次给出。", "eos", len("整个回答，一次给出。"))
    # Read as leniently as a plain completion: such servers are seldom strict about the rest of the body.
    from engine.chat_worker import whole_reply

    assert whole_reply(b'{"choices": [{"message": {"content": "ok"}, "finish_reason": null}]}') == ("ok", "eos", None)
    assert whole_reply(b'{"choices": [{"message": {"content": "ok"}, "finish_reason": "length"}], '
                       b'"usage": {"completion_tokens": 7}}') == ("ok", "length", 7)
    events = b'data: {"choices": [{"delta": {"content": "a"}}]}\n\ndata: {"choices": [{"delta": {"content": "b"}}]}\n\n'
    assert whole_reply(events) == ("ab", None, None)  # events under a wrong content type, ended before a finish
    assert whole_reply(events + b'data: {"choices": [{"delta": {}, "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'
                       ) == ("ab", "eos", None)


def test_an_exported_chat_with_one_model_names_it_alone(tmp_path):
    from console.exports import export_chats

    chat = {"id": 1, "created": 0.0, "left_model": "runs/1/final", "right_model": "", "blind": 0, "vote": None,
            "settings": "{}", "transcript": json.dumps({"left": [{"role": "user", "content": "hi"}]})}
    md, _ = export_chats([chat], tmp_path)
    text = md.read_text(encoding="utf-8")
    assert "model: `runs/1/final`" in text and "right:" not in text


@sync
async def test_a_new_chat_starts_from_the_sampling_settings_set_in_the_last(workdir):
    from console.screens.chat import ChatSettingsScreen
    from console.screens.runs import RunsScreen

    app = console()
    async with app.run_test(size=(100, 32)) as pilot:
        await wait_for(pilot, lambda: app.loaded, 20, "the runs")
        app.open_chat(str(workdir / "no-model-here"))
        # Until the screen's mount has focused its question box, "o" would be typed into the box.
        await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen) and app.focused is not None
                       and app.focused.id == "chat-input", 10, "the chat, its question box focused")
        await pilot.press("escape", "o")  # out of the question box: the screen's keys
        await wait_for(pilot, lambda: isinstance(app.screen, ChatSettingsScreen), 10, "the settings")
        await pilot.resize_terminal(80, 24)  # every field and the button on an 80x24 terminal (key_env was below)
        await wait_for(pilot, lambda: app.screen.query_one("#apply").region.bottom <= 24
                       and app.screen.query_one("#apply").region.height > 0, 10, "the dialog laid out at 80x24")
        assert all(0 < field.region.bottom <= 24 for field in app.screen.query("Input"))
        await pilot.resize_terminal(100, 32)
        app.screen.query_one("#set-temperature").value = "0.2"
        app.screen.query_one("#set-top_p").value = "1.5"  # refused, with the range it must be in
        app.screen.apply()
        assert isinstance(app.screen, ChatSettingsScreen)
        assert str(app.screen.query_one("#settings-error").render()) == "top_p: above 0 and at most 1, not 1.5"
        app.screen.query_one("#set-top_p").value = "1"
        app.screen.query_one("#set-max_new_tokens").value = "64"
        app.screen.apply()
        await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen.settings.temperature == 0.2,
                       10, "the settings applied")
        app.pop_screen()  # at once: the settings reach the app all the same (they were lost with the screen)
        await wait_for(pilot, lambda: getattr(app.chat_settings, "temperature", None) == 0.2, 10, "kept by the app")
        await wait_for(pilot, lambda: isinstance(app.screen, RunsScreen), 10, "back")
        app.open_chat(str(workdir / "no-model-here"))
        await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen), 10, "the next chat")
        assert (app.screen.settings.temperature, app.screen.settings.max_new_tokens) == (0.2, 64)


@sync
async def test_a_pasted_prompt_keeps_its_lines_and_an_unreachable_endpoint_is_named(workdir, monkeypatch):
    """A paste of several lines was cut to its first, silently (Textual's Input holds one line): the whole
    text goes to the model, and ctrl+j adds a line by hand. A connection that fails names the URL."""
    from textual import events

    from tests.judge_server import JudgeServer

    server = JudgeServer(lambda body, index: ("reply", "ok"))
    try:
        app = console()
        async with app.run_test(size=(100, 32)) as pilot:
            screen = await open_chat(pilot, app, f"openai:served@{server.url}", None, ChatSettings(key_env=""))
            box = screen.query_one("#chat-input")
            assert app.focused is box
            pasted = "Line one of the paste\nLine two 第二行\n\nLine four after a blank"
            app.post_message(events.Paste(pasted))  # as the terminal driver delivers a bracketed paste
            await wait_for(pilot, lambda: box.text == pasted, 10, "the paste, whole")
            await pilot.press("ctrl+j", "o", "k", "?", "enter")
            await wait_for(pilot, lambda: len(screen.turns["left"]) == 2, 30, "the answer")
            assert server.calls[0]["messages"][-1]["content"] == pasted + "\nok?"
            assert box.text == ""
            question = screen.panes["left"].body.query(".user-turn").first()
            assert str(question.render()) == "> " + pasted + "\nok?"
            await pilot.press("escape", "q")  # leaving would lose the unsaved conversation: asked first
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), 10, "the question")
            assert str(app.screen.question).startswith("leaving the chat: this conversation (1 question)")
            assert str(app.screen.question).endswith("Leave? (n, then S saves it first)")  # not "Start over?"
            await pilot.press("n")
            await wait_for(pilot, lambda: app.screen is screen, 10, "the chat, kept")

            server.close()  # the endpoint goes away: the error says which one
            await pilot.press("escape", "r")
            await wait_for(pilot, lambda: screen.panes["left"].query(".pane-error"), 120, "the error")
            error = str(screen.panes["left"].query(".pane-error").first().render())
            assert f"no answer from {server.url}" in error, error
    finally:
        server.close()


@sync
async def test_a_conversation_reads_from_the_top_again_after_the_terminal_shrinks_and_grows(workdir):
    """Shrunk, the conversation is taller than its pane and follows its newest line; grown back, it read from
    the pane's bottom under a void as tall as the pane (Textual kept a negative scroll offset it would not
    scroll away from, as nothing was left to scroll)."""
    from tests.judge_server import JudgeServer

    server = JudgeServer(lambda body, index: ("reply", "A longer answer, " * 20))
    try:
        app = console()
        async with app.run_test(size=(160, 48)) as pilot:
            screen = await open_chat(pilot, app, f"openai:served@{server.url}", None, ChatSettings(key_env=""))
            await ask(pilot, screen, "Is an apple red?")
            await wait_for(pilot, lambda: len(screen.turns["left"]) == 2, 30, "the answer")
            body = screen.panes["left"].body

            def question_row() -> int:
                return body.children[0].region.y - body.region.y

            await wait_for(pilot, lambda: question_row() == 1 and body.scroll_y == 0, 10, "the exchange at the top")
            await pilot.resize_terminal(40, 12)
            await wait_for(pilot, lambda: body.max_scroll_y > 0 and body.scroll_y == body.max_scroll_y, 10,
                           "the newest line in view")
            await pilot.resize_terminal(160, 48)
            await wait_for(pilot, lambda: body.max_scroll_y == 0 and question_row() == 1 and body.scroll_y == 0, 10,
                           "the exchange at the top again")
    finally:
        server.close()
