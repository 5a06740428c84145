"""`rlhf eval`: a BELLE-format evaluation of the tiny checkpoint end to end, through the real command,
a real runs.db and a chat-completions server on loopback; the reward-model judge; pairwise; the table."""

import json
import math
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from engine.belle import CATEGORIES
from engine.store import EvalStore, Store
from engine.train import run_stage
from tests.conftest import RLHF, TINY
from tests.helpers import metric, run_row
from tests.judge_server import JudgeServer, first_slot, hanging_at, score_by_answer

KEY = "sk-never-on-disk-7f3a9c"
CLASSES = {  # a class name as the data spells it -> one as the prompt file does (BELLE's mismatches)
    "math": "math", "code": "code", "rewrite": "rewrite", "classification": "classification",
    "generation": "generation", "summarization": "summarization", "extract": "extract", "open qa": "open QA",
    "brainstorming": "brainstorming", "closed\xa0qa": "closed QA",
}


def write_sample(folder: Path, per_class: int = 2, ask: str = "What is {k} plus {n}?") -> int:
    """A small eval folder in BELLE's format (JSON Lines named .json), with its quirks."""
    folder.mkdir()
    with open(folder / "eval_prompt.json", "w", encoding="utf-8") as out:
        for spelled in CLASSES.values():
            out.write(json.dumps({"class": spelled, "prompt": f"请给{spelled}类的回答打分，按\"得分:\"输出。"},
                                 ensure_ascii=False) + "\n")
    rows = []
    for cls in CLASSES:
        for k in range(per_class):
            no_ref = cls in ("generation", "brainstorming") or (cls == "rewrite" and k == 0)
            rows.append({"question": ask.format(k=k, n=len(cls)), "std_answer": "" if no_ref else f"{k + len(cls)}",
                         "class": cls})
    (folder / "eval_set.json").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows),
                                          encoding="utf-8")  # no newline at the end, as BELLE's
    return len(rows)


def rlhf_eval(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*RLHF, "eval", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def judge_args(server: JudgeServer, answering: bool = True) -> list[str]:
    """`answering`: with the generation's settings (an --answers-from run takes its source's)."""
    return ["--judge", "openai", "--judge-url", server.url, "--judge-model", "tiny-judge", "--judge-key-env",
            "THE_JUDGE_KEY", "--concurrency", "2", *(["--max-new-tokens", "12", "--batch-size", "4"] if answering
                                                     else [])]


def test_the_judge_preflight_refuses_only_an_endpoint_that_cannot_be_reached(monkeypatch):
    """The look at the model list before hours of answers: only a URL that cannot be reached stops the
    command. A model list refused to the key (a key allowed chat alone), one without the model (a proxy's
    partial list) or no model list at all are what the calls will tell."""
    import socket

    from engine.judge.endpoint import EndpointJudge, JudgeSetupError

    monkeypatch.setenv("THE_JUDGE_KEY", KEY)
    said = {}
    for name, server in (("no list", JudgeServer(score_by_answer)),
                         ("listed", JudgeServer(score_by_answer, models=["tiny-judge"])),
                         ("other", JudgeServer(score_by_answer, models=["gpt-4o"])),
                         ("refused", JudgeServer(score_by_answer, models_refused=True))):
        try:
            said[name] = EndpointJudge(server.url, "tiny-judge", "THE_JUDGE_KEY").preflight()
        finally:
            server.close()
    assert said["no list"] is None and said["listed"] is None
    assert "--judge-model tiny-judge: " in said["other"] and "does not list it (it lists gpt-4o)" in said["other"]
    assert "refuses the key for its model list (HTTP 401" in said["refused"] and KEY not in said["refused"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(JudgeSetupError, match=rf"--judge-url http://127.0.0.1:{port}/v1: cannot be reached"):
        EndpointJudge(f"http://127.0.0.1:{port}/v1", "tiny-judge", "THE_JUDGE_KEY").preflight()


def test_an_evaluation_killed_midway_resumes_without_gaps_and_reruns_free(workdir):
    n = write_sample(workdir / "belle")
    release = threading.Event()
    server = JudgeServer(hanging_at(6, release))  # the seventh call hangs: the run is killed while it waits
    env = {"THE_JUDGE_KEY": KEY}
    try:
        proc = subprocess.Popen([*RLHF, "eval", "belle", "demo/model", "--eval-dir", "belle", *judge_args(server),
                                 "--name", "tiny"], env={**os.environ, **env}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 180
        while len(server.calls) < 7 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert len(server.calls) >= 7, proc.stdout.read() if proc.poll() is not None else "no calls"
        proc.send_signal(signal.SIGKILL)  # no chance to record anything
        out = proc.communicate(timeout=60)[0]
        assert "20 of 20 items scorable" in out and "judge: 20 calls to make (0 answered by the cache)" in out
        with Store(os.environ["RLHF_DB"]) as store:
            run = store.run(1)
            assert run["stage"] == "eval" and run["status"] == "running"  # as the kill left it
            evals = EvalStore(store)
            assert all(i["answer"] is not None for i in evals.items(1))  # answers are stored before judging
            judged_before = {j["item_id"]: j["score"] for j in evals.judgments(1)}
        assert 0 < len(judged_before) < n
        release.set()
        looked = subprocess.run([*RLHF, "runs", "--json"], capture_output=True, text=True, timeout=120)
        closed = next(r for r in map(json.loads, looked.stdout.splitlines()) if r["id"] == 1)  # processes gone
        assert closed["status"] == "failed" and "checkpoint" not in closed["error"], closed  # it has none
        assert closed["error"].endswith("resume it to continue where it stopped (its answers and verdicts so far are "
                                        "kept)"), closed

        resumed = rlhf_eval("belle", "--resume-run", "1", env=env)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        # Every item not judged before the kill is judged now: by a call, or by the cache when its reply
        # had arrived (and was cached) but the kill came before its verdict was stored.
        plan = re.search(r"judge: (\d+) calls? to make \((\d+) answered by the cache\)", resumed.stdout)
        assert plan and int(plan.group(1)) + int(plan.group(2)) == n - len(judged_before), resumed.stdout
        with Store(os.environ["RLHF_DB"]) as store:
            evals = EvalStore(store)
            judgments = evals.judgments(1)
            assert sorted(j["item_id"] for j in judgments) == sorted(i["item_id"] for i in evals.items(1))
            assert len(judgments) == n  # no item twice, none missing
            assert all(j["status"] == "scored" for j in judgments)
            for j in judgments:  # verdicts stored before the kill were kept as they were
                if j["item_id"] in judged_before:
                    assert j["score"] == judged_before[j["item_id"]]
            assert store.run(1)["status"] == "done"

        finished = rlhf_eval("belle", "--resume-run", "1")  # without the judge's key: nothing is left to judge
        assert finished.returncode == 2 and "run 1 is done: every question has its verdict" in finished.stderr

        calls = len(server.calls)
        again = rlhf_eval("belle", "demo/model", "--eval-dir", "belle", *judge_args(server), "--name", "tiny again",
                          env=env)
        assert again.returncode == 0, again.stderr
        assert len(server.calls) == calls  # an unchanged re-run asks the judge nothing
        assert f"judge: 0 calls to make ({n} answered by the cache)" in again.stdout
        assert f"{n} of {n} answered\njudge: 0 calls" in again.stdout  # the answers' last count, then the judge
        assert "judge spent" not in again.stdout
        with Store(os.environ["RLHF_DB"]) as store:  # and spends nothing: the first run paid
            assert {(j["calls"], j["prompt_tokens"]) for j in EvalStore(store).judgments(2)} == {(0, 0)}

        table = subprocess.run([*RLHF, "eval", "table", "--format", "csv"], capture_output=True, text=True)
        assert table.returncode == 0 and "tiny again" in table.stdout
        Path("table.md").write_text(subprocess.run([*RLHF, "eval", "table"], capture_output=True, text=True).stdout)
        Path("table.json").write_text(subprocess.run([*RLHF, "eval", "table", "--format", "json"],
                                                     capture_output=True, text=True).stdout)
    finally:
        release.set()
        server.close()
    assert all(k == f"Bearer {KEY}" for k in server.keys_seen)
    # The key came through its variable and is nowhere on disk: runs.db (with its WAL), logs, run folders, tables.
    leaks = [p for p in workdir.rglob("*") if p.is_file() and not p.is_symlink() and KEY.encode() in p.read_bytes()]
    assert leaks == []
    rows = json.loads(Path("table.json").read_text())
    mine = [r for r in rows if r["run_id"] == 1][0]
    assert {c: mine["columns"][c]["n"] for c in CATEGORIES} == {
        "others": 4, "rewrite": 2, "classification": 2, "generation": 2, "summarization": 2, "extract": 2,
        "open qa": 2, "brainstorming": 2, "closed qa": 2}
    # The run's last macro (the run table's figure), killed and resumed between, is the table's macro
    assert metric(1, "eval/score_macro")[-1][1] == pytest.approx(mine["columns"]["macro"]["mean"], abs=1e-6)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["console-stop", "ctrl-c"])
def test_a_stopped_evaluation_says_how_to_continue_and_that_works_from_anywhere(workdir, tmp_path_factory, stop):
    n = write_sample(workdir / "belle", per_class=1)
    release = threading.Event()
    server = JudgeServer(hanging_at(2, release))  # the third call hangs while the run is stopped
    env = {**os.environ, "THE_JUDGE_KEY": KEY}
    try:
        proc = subprocess.Popen([*RLHF, "eval", "belle", "demo/model", "--eval-dir", "belle", *judge_args(server)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 180
        while len(server.calls) < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert len(server.calls) >= 3, proc.communicate()[1][-2000:] if proc.poll() is not None else "no calls"
        proc.send_signal(stop)
        release.set()
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 143, err[-2000:]
        assert "Traceback" not in err
        assert ("Ctrl-C: stopping after the batch in hand" in err) == (stop == signal.SIGINT)
        assert run_row(1)["status"] == "stopped"
        log = (Path(run_row(1)["output_dir"]) / "train.log").read_text(encoding="utf-8")
        assert f"stopped: {n} of {n} answered, " in log and "every answer and verdict so far is kept" in log
        # The calls in flight at the stop were paid for: awaited, and their verdicts kept (they were dropped,
        # and the resume paid for them again)
        with Store(os.environ["RLHF_DB"]) as store:
            assert len(EvalStore(store).judgments(1)) == len(server.calls)
        hint = out.split("continue it with: ")[1].strip()
        assert hint == f"rlhf eval belle --resume-run 1 --db {os.environ['RLHF_DB']}"

        # From a folder with no runs.db, no demo and no eval files, and no RLHF_DB to point the way.
        elsewhere = tmp_path_factory.mktemp("elsewhere")
        env.pop("RLHF_DB")
        (workdir / "belle").rename(workdir / "moved")  # a resume that cannot start leaves the run as it was
        refused = subprocess.run([*RLHF, *hint.split()[1:]], cwd=elsewhere, env=env, capture_output=True, text=True,
                                 timeout=300)
        assert refused.returncode == 2 and "--eval-dir" in refused.stderr, refused.stderr[-1000:]
        assert run_row(1)["status"] == "stopped"
        (workdir / "moved").rename(workdir / "belle")
        resumed = subprocess.run([*RLHF, *hint.split()[1:]], cwd=elsewhere, env=env, capture_output=True, text=True,
                                 timeout=300)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert not (elsewhere / "runs.db").exists() and not (elsewhere / "runs").exists()
        with Store(os.environ["RLHF_DB"]) as store:
            assert store.run(1)["status"] == "done"
            assert len(EvalStore(store).judgments(1)) == n
        assert len(server.calls) == n  # one paid call per question, the stop and the resume included
    finally:
        release.set()
        server.close()


def test_a_judge_that_refuses_every_call_fails_the_run_at_once_with_the_reason(workdir):
    write_sample(workdir / "belle", per_class=1)
    server = JudgeServer(lambda body, index: ("status", 401, "echo the key"))
    try:
        result = rlhf_eval("belle", "demo/model", "--eval-dir", "belle", *judge_args(server),
                           env={"THE_JUDGE_KEY": KEY})
    finally:
        server.close()
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and KEY not in result.stderr
    assert "refused the call (HTTP 401: " in result.stderr and "check --judge-key-env" in result.stderr
    assert f"then continue it: rlhf eval belle --resume-run 1 --db {os.environ['RLHF_DB']}" in result.stderr
    assert len(server.calls) <= 2  # the calls in flight (concurrency 2), not one per item
    row = run_row(1)
    assert row["status"] == "failed" and "refused the call" in row["error"] and KEY not in row["error"]
    with Store(os.environ["RLHF_DB"]) as store:
        assert all(i["answer"] is not None for i in EvalStore(store).items(1))  # the answers stay for the resume
    # Failed before any score: no row of dashes in the table, unless asked for by id.
    listed = [r["run_id"] for r in json.loads(rlhf_eval("table", "--format", "json").stdout)]
    named = [r["run_id"] for r in json.loads(rlhf_eval("table", "--format", "json", "--runs", "1").stdout)]
    assert (listed, named) == ([None], [None, 1])


def test_calls_dropped_when_a_refusal_ends_the_run_are_not_retried_or_warned_about(workdir):
    """One call refused (HTTP 401) ends the run while another hangs: the process ends at once all the same
    (it waited out the hung call, up to the client's 120 s timeout), the hung call is not retried, and no
    'judge call failed ... retry' warning about it precedes the refusal's own error."""
    write_sample(workdir / "belle", per_class=1)
    release = threading.Event()
    hung_since = []

    def script(body: dict, index: int) -> tuple:
        if index == 0:
            hung_since.append(time.monotonic())
            release.wait(600)  # hangs until the test ends
            return score_by_answer(body, index)
        return ("status", 401, "bad key")

    server = JudgeServer(script)
    try:
        result = rlhf_eval("belle", "demo/model", "--eval-dir", "belle", *judge_args(server), "--limit", "3",
                           env={"THE_JUDGE_KEY": KEY})
        ended = time.monotonic()
    finally:
        release.set()
        server.close()
    # Waiting for the hung call, the process could not have ended before its client's 120 s timeout.
    assert ended - hung_since[0] < 110, ended - hung_since[0]
    assert result.returncode == 1 and "refused the call (HTTP 401: bad key)" in result.stderr, result.stderr[-2000:]
    # One batch of answers: its line is the last one too, said once (it was printed again before the judge's)
    assert len(re.findall(r" 3 of 3 answered$", result.stdout, re.M)) == 1, result.stdout
    assert "judge call failed" not in result.stderr
    assert len(server.calls) == 2


def test_an_evaluation_whose_every_judge_call_failed_is_a_failed_run(workdir):
    """A judge that is down once the answers are made (it answered the look at its model list before,
    then fails every call): not one verdict, so the run fails with the reason and the resume command,
    exit 1 (it used to end `done`, exit 0, with nothing in it)."""
    write_sample(workdir / "belle", per_class=1)
    down = JudgeServer(lambda body, index: ("status", 503, "upstream down"), models=["m"])
    try:
        result = rlhf_eval("belle", "demo/model", "--eval-dir", "belle", "--judge", "openai", "--judge-url",
                           down.url, "--judge-model", "m", "--judge-key-env", "THE_JUDGE_KEY", "--max-new-tokens",
                           "4", "--limit", "3", "--judge-retries", "0", env={"THE_JUDGE_KEY": KEY})
    finally:
        down.close()
    assert result.returncode == 1, result.stderr[-2000:]
    assert "every judge call failed (3 items), the first: " in result.stderr and "Traceback" not in result.stderr
    assert f"continue it: rlhf eval belle --resume-run 1 --db {os.environ['RLHF_DB']}" in result.stderr
    row = run_row(1)
    assert row["status"] == "failed" and "every judge call failed" in row["error"]
    with Store(os.environ["RLHF_DB"]) as store:
        assert all(i["answer"] is not None for i in EvalStore(store).items(1))  # kept for the resume


def test_a_resume_takes_a_new_judge_url_and_refuses_what_would_change_the_run(workdir):
    """The failed run's message says to check --judge-url and resume: the resume takes the new URL (it
    ignored every option and called the old one again), records it, and refuses options that would change
    the answers or the scores, before it claims the run."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on: a wrong URL
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    write_sample(workdir / "belle", per_class=1)
    env = {"THE_JUDGE_KEY": KEY}
    args = ["--judge-model", "m", "--judge-key-env", "THE_JUDGE_KEY", "--max-new-tokens", "4", "--limit", "3",
            "--judge-retries", "0"]
    nowhere = rlhf_eval("belle", "demo/model", "--eval-dir", "belle", "--judge-url", f"http://127.0.0.1:{port}/v1",
                        *args, env=env)  # said before an answer is generated for it, and nothing registered
    assert nowhere.returncode == 2 and f"--judge-url http://127.0.0.1:{port}/v1: cannot be reached" in \
        nowhere.stderr and "answer:" not in nowhere.stdout, nowhere.stderr[-2000:]
    if Path(os.environ["RLHF_DB"]).exists():
        with Store(os.environ["RLHF_DB"]) as store:
            assert store.runs() == []
    down = JudgeServer(lambda body, index: ("status", 503), models=["m"])  # up, listing it, failing every call
    result = rlhf_eval("belle", "demo/model", "--eval-dir", "belle", "--judge-url", down.url, *args, env=env)
    down.close()
    assert result.returncode == 1 and run_row(1)["status"] == "failed", result.stderr[-2000:]
    assert "does not list it" not in result.stderr
    server = JudgeServer(score_by_answer)
    try:
        refused = rlhf_eval("belle", "--resume-run", "1", "--judge-url", server.url, "--temperature", "0.7",
                            "--limit", "5", "--max-new-tokens", "4", env=env)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert ("run 1: a resume continues the evaluation as it was started, and --limit 5 (run 1: 3); "
                "--temperature 0.7 (run 1: 0.0) would change its answers or scores") in refused.stderr
        other = rlhf_eval("belle", "2", "--resume-run", "1", env=env)
        assert other.returncode == 2 and "checkpoint 2: " in other.stderr
        # A question inserted at the top since: every id (a line number) is another question now.
        eval_set = workdir / "belle" / "eval_set.json"
        original = eval_set.read_text(encoding="utf-8")
        eval_set.write_text('{"question": "新插入的问题", "std_answer": "2", "class": "math"}\n' + original,
                            encoding="utf-8")
        moved = rlhf_eval("belle", "--resume-run", "1", "--judge-url", server.url, env=env)
        assert moved.returncode == 2 and f"{eval_set} changed since run 1 began" in moved.stderr, moved.stderr
        first, rest = original.split("\n", 1)
        edited = json.loads(first)
        edited["std_answer"] += " (edited)"  # the same question, another reference for the judge
        eval_set.write_text(json.dumps(edited, ensure_ascii=False) + "\n" + rest, encoding="utf-8")
        moved = rlhf_eval("belle", "--resume-run", "1", "--judge-url", server.url, env=env)
        assert moved.returncode == 2 and f"{eval_set}:1: its std_answer changed since run 1 began" in moved.stderr
        eval_set.write_text(original, encoding="utf-8")
        assert run_row(1)["status"] == "failed" and server.calls == []  # nothing claimed, nothing called
        resumed = rlhf_eval("belle", "--resume-run", "1", "--judge-url", server.url, "--judge-model", "tiny-judge",
                            "--limit", "3", env=env)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert f"run 1 resumes with --judge-url {server.url}, --judge-model tiny-judge" in resumed.stdout
        assert len(server.calls) == 3 and {c["model"] for c in server.calls} == {"tiny-judge"}
        recorded = json.loads(run_row(1)["config"])
        assert (recorded["judge_url"], recorded["judge_model"], recorded["limit"]) == (server.url, "tiny-judge", 3)
        done = rlhf_eval("belle", "--resume-run", "1", "--judge-model", "another", env=env)
        assert done.returncode == 2 and "run 1 is done: every question has its verdict" in done.stderr
        with Store(os.environ["RLHF_DB"]) as store:  # as if a call had failed: judged answers, one to go
            store.update_run(1, status="failed")
        slash = rlhf_eval("belle", "--resume-run", "1", "--judge-url", server.url + "/", env=env)
        assert slash.returncode == 0 and "resumes with" not in slash.stdout, slash.stderr  # the same endpoint
        with Store(os.environ["RLHF_DB"]) as store:
            store.update_run(1, status="failed")
        judged = rlhf_eval("belle", "--resume-run", "1", "--judge-model", "another", env=env)
        assert judged.returncode == 2 and "run 1 has 3 answers judged by tiny-judge" in judged.stderr
        elsewhere = rlhf_eval("belle", "--resume-run", "1", "--judge-url", server.url.replace("127.0.0.1", "localhost"),
                              env=env)  # the same server by another name: its scores would carry another label
        assert elsewhere.returncode == 2 and "one run has one judge" in elsewhere.stderr, elsewhere.stderr
    finally:
        server.close()


def test_a_judge_that_never_gives_a_score_fails_the_run_and_is_asked_again_once_fixed(workdir):
    """Replies without a score (a wrong judge model or prompt, a proxy's page): not a `done` run with
    nothing in it, and nothing cached for good: once the judge is right, the resume asks again."""
    write_sample(workdir / "belle", per_class=1)
    fixed = threading.Event()
    server = JudgeServer(lambda body, index: score_by_answer(body, index) if fixed.is_set()
                         else ("reply", "I am sorry, I cannot grade this."), models=["gpt-4o", "tiny-judge-v2"])
    env = {"THE_JUDGE_KEY": KEY}
    try:
        result = rlhf_eval("belle", "demo/model", "--eval-dir", "belle", *judge_args(server), "--limit", "3",
                           env=env)
        assert result.returncode == 1, result.stderr[-2000:]
        # A model the endpoint does not list: said before the answers (a proxy may list only some: a warning)
        assert (f"judge: --judge-model tiny-judge: {server.url} does not list it (it lists gpt-4o, tiny-judge-v2)"
                in result.stderr)
        assert ("the judge gave no usable score for 3 answers (6 calls), the first: 'I am sorry, I cannot grade "
                "this.' (no score in the reply)") in result.stderr
        assert run_row(1)["status"] == "failed" and "judge spent: 6 calls, " in result.stdout  # paid all the same
        assert metric(1, "eval/score_mean") == [] and metric(1, "eval/unscored")  # no mean, not a mean of 0
        asked = len(server.calls)
        fixed.set()
        # The message asks whether --judge-model is right: a resume may change it, since nothing has a score
        # (the unscored are asked again; it was refused as "3 answers judged by tiny-judge").
        resumed = rlhf_eval("belle", "--resume-run", "1", "--judge-model", "tiny-judge-v2", env=env)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "run 1 resumes with --judge-model tiny-judge-v2" in resumed.stdout
        assert "judged 3 of 3: 3 scored, 0 unscored" in resumed.stdout
        assert len(server.calls) == asked + 3  # not answered from a cache of the replies without a score
        assert {call["model"] for call in server.calls[asked:]} == {"tiny-judge-v2"}
    finally:
        server.close()
    with Store(os.environ["RLHF_DB"]) as store:
        assert [j["status"] for j in EvalStore(store).judgments(1)] == ["scored"] * 3
        assert {j["judge"] for j in EvalStore(store).judgments(1)} == {f"openai:tiny-judge-v2@{server.url}"}


def test_an_item_the_judge_refuses_is_unscored_with_the_reason_and_a_judge_refusing_all_fails(workdir):
    """An HTTP 400 for one item (its prompt over the judge's context) kept the run failed, and every
    resume asked it again in vain: it is that item's verdict, unscored, and the run is done. A judge that
    refuses every call (a request its model does not take) gives no score: the run fails, saying why."""
    write_sample(workdir / "belle", per_class=1)
    fixed = threading.Event()

    def script(body: dict, index: int) -> tuple:
        if not fixed.is_set() or "请给math类" in body["messages"][-1]["content"]:
            return ("status", 400, "This model's maximum context length is 8 tokens")
        return score_by_answer(body, index)

    server = JudgeServer(script)
    env = {"THE_JUDGE_KEY": KEY}
    try:
        result = rlhf_eval("belle", "demo/model", "--eval-dir", "belle", *judge_args(server), "--limit", "3",
                           env=env)
        assert result.returncode == 1 and run_row(1)["status"] == "failed", result.stderr[-2000:]
        assert ("the judge gave no usable score for 3 answers (3 calls), the first: the judge refused it: "
                "HTTP 400: This model's maximum context length is 8 tokens; does the endpoint take "
                "--judge-model's requests?") in result.stderr
        assert len(server.calls) == 3  # refusals are not retried
        fixed.set()
        resumed = rlhf_eval("belle", "--resume-run", "1", env=env)
        assert resumed.returncode == 0 and run_row(1)["status"] == "done", resumed.stderr[-2000:]
        assert ("judged 3 of 3: 2 scored, 1 unscored (1 refused by the judge, the first: HTTP 400: This model's "
                "maximum context length is 8 tokens), 0 failed calls") in resumed.stdout
    finally:
        server.close()
    with Store(os.environ["RLHF_DB"]) as store:
        judged = {j["class"]: j for j in EvalStore(store).scored_items(1)}
    assert judged["math"]["status"] == "unscored" and judged["math"]["score"] is None
    assert judged["math"]["problem"].startswith("the judge refused it: HTTP 400")
    assert sorted(j["status"] for j in judged.values()) == ["scored", "scored", "unscored"]


def test_a_done_evaluation_with_an_unscored_reply_resumes_to_ask_it_again(workdir):
    """Done: every answer has a verdict, one of them a reply without a score. A resume asks that one again
    (it was refused: 'every question has its verdict'); a run with every answer scored is still refused."""
    write_sample(workdir / "belle", per_class=1)
    fixed = threading.Event()
    server = JudgeServer(lambda body, index: ("reply", "no idea") if "请给math类" in body["messages"][-1]["content"]
                         and not fixed.is_set() else score_by_answer(body, index))
    env = {"THE_JUDGE_KEY": KEY}
    try:
        done = rlhf_eval("belle", "demo/model", "--eval-dir", "belle", *judge_args(server), "--limit", "3", env=env)
        assert done.returncode == 0 and run_row(1)["status"] == "done", done.stderr[-2000:]
        assert "judged 3 of 3: 2 scored, 1 unscored" in done.stdout
        # Asked again and still without a score: the run stays done (its other answers are scored), not
        # failed as a judge that gave no score at all
        still = rlhf_eval("belle", "--resume-run", "1", env=env)
        assert still.returncode == 0 and run_row(1)["status"] == "done", still.stderr[-2000:]
        asked = len(server.calls)
        fixed.set()
        again = rlhf_eval("belle", "--resume-run", "1", env=env)
        assert again.returncode == 0, again.stderr[-2000:]
        assert len(server.calls) == asked + 1 and run_row(1)["status"] == "done"
        assert "judged 3 of 3: 3 scored, 0 unscored" in again.stdout, again.stdout
        refused = rlhf_eval("belle", "--resume-run", "1", env=env)
        assert refused.returncode == 2 and "run 1 is done: every question has its verdict" in refused.stderr
    finally:
        server.close()


def test_an_evaluation_with_some_failed_judge_calls_is_not_done_and_its_resume_asks_only_those(workdir):
    """Done means every question has its verdict: with one call failed (after its retries), the run fails,
    its other verdicts and its results files kept, and its resume asks that one question again."""
    write_sample(workdir / "belle", per_class=1)
    release = threading.Event()

    def script(body: dict, index: int) -> tuple:
        if index == 0:  # a call past --judge-timeout
            release.wait(60)
            return ("status", 500, "upstream overloaded")
        reply = score_by_answer(body, index)
        return ("no-usage", reply[1]) if index == 3 else reply  # the resume's call: a server that keeps it

    server = JudgeServer(script)
    env = {"THE_JUDGE_KEY": KEY}
    try:
        result = rlhf_eval("belle", "demo/model", "--eval-dir", "belle", *judge_args(server), "--limit", "3",
                           "--judge-retries", "0", "--judge-timeout", "8", env=env)
        release.set()
        assert result.returncode == 1, result.stderr[-2000:]
        assert "judged 2 of 3: 2 scored, 0 unscored, 1 failed calls" in result.stdout
        assert "judge calls failed, the first: gave up after 1 try: APITimeoutError" in result.stderr
        # What the calls cost as the server reported it (a character a token): the failed one reported nothing.
        prompt = sum(len(call["messages"][-1]["content"]) for call in server.calls[1:])
        completion = sum(len(score_by_answer(call, k)[1]) for k, call in enumerate(server.calls) if k)
        assert f"judge spent: 3 calls, {prompt:,} prompt + {completion:,} completion tokens\n" in result.stdout
        assert "error: 1 of 3 judge calls failed, the first: " in result.stderr
        assert f"to ask those again: rlhf eval belle --resume-run 1 --db {os.environ['RLHF_DB']}" in result.stderr
        row = run_row(1)  # the reason, as the terminal said it: not a traceback ending in a class name
        assert row["status"] == "failed" and row["error"].startswith("error: 1 of 3 judge calls failed, the first: ")
        answers = (Path(row["output_dir"]) / "answers.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(answers) == 3 and sum(json.loads(a)["score"] is not None for a in answers) == 2
        resumed = rlhf_eval("belle", "--resume-run", "1", env=env)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert len(server.calls) == 4 and run_row(1)["status"] == "done"
        assert ("judge spent: 1 call, 0 prompt + 0 completion tokens (and the calls of 1 answer whose usage the "
                "endpoint did not report: not counted)") in resumed.stdout
        with Store(os.environ["RLHF_DB"]) as store:  # unknown, not 0
            assert sorted(str(j["prompt_tokens"]) for j in EvalStore(store).judgments(1)).count("None") == 1
    finally:
        server.close()
    with Store(os.environ["RLHF_DB"]) as store:
        assert [j["status"] for j in EvalStore(store).judgments(1)] == ["scored"] * 3


def test_the_reward_model_judges_offline(workdir, monkeypatch):
    rm_run, _ = run_stage("rm", str(TINY), ["train.max_steps=4", "train.eval_ratio=0"])
    rm = Path(run_row(rm_run)["output_dir"]) / "final"
    write_sample(workdir / "belle", per_class=1)
    done = rlhf_eval("belle", "demo/model", "--eval-dir", "belle", "--judge", "rm", "--reward-model", str(rm),
                     "--max-new-tokens", "8")
    assert done.returncode == 0, done.stderr
    assert "no calls" in done.stdout
    from engine.judge.reward import RewardJudge

    judge = RewardJudge(str(rm), "cpu")
    import engine.judge.reward
    from engine.belle import load_items as all_items

    monkeypatch.setattr(engine.judge.reward, "CALIBRATION_CHUNK", 4)  # several chunks of this small set
    asked = []  # a stop during the references' scoring is taken between chunks, not after all of them
    assert not judge.calibrate(all_items(workdir / "belle"), lambda: asked.append(1) or len(asked) > 1)
    assert len(asked) == 2 and (judge.mu, judge.sigma) == (0.0, 1.0)
    with Store(os.environ["RLHF_DB"]) as store:
        rows = EvalStore(store).scored_items(2)
    assert len(rows) == 10 and all(0 < r["score"] < 1 for r in rows)
    from engine.belle import load_items

    items = {i.id: i for i in load_items(workdir / "belle")}
    with_ref = next(r for r in rows if r["reference"])
    r_answer, r_ref = judge._rewards([items[with_ref["item_id"]]] * 2, [with_ref["answer"], with_ref["reference"]])
    assert with_ref["score"] == pytest.approx(1 / (1 + math.exp(-(r_answer - r_ref))), abs=1e-5)
    # Once calibrated, judging scores the answers alone: each reference's reward is calibration's.
    assert judge.calibrate(all_items(workdir / "belle"))
    scored_texts = []
    rewards = judge._rewards
    monkeypatch.setattr(judge, "_rewards", lambda its, texts: scored_texts.extend(texts) or rewards(its, texts))
    verdicts = judge.judge([items[r["item_id"]] for r in rows], [r["answer"] for r in rows])
    assert sorted(scored_texts) == sorted(r["answer"] for r in rows) and len(verdicts) == len(rows)

    # The first 6 questions hold 4 of the 7 references: an answer without a reference is still scored
    # against the whole eval set's, so a subset's scores are the full run's.
    # (an rm run's id names its export, as a checkpoint's does)
    part = rlhf_eval("belle", "--answers-from", "2", "--limit", "6", "--judge", "rm", "--reward-model", str(rm_run))
    assert part.returncode == 0, part.stderr
    from engine.eval_cli import eval_rows
    from engine.evaluate import config_from_run

    # Its answers were made with run 2's 8 tokens: so its record and its label (they said 512, the default)
    assert config_from_run(os.environ["RLHF_DB"], 3).max_new_tokens == 8
    assert eval_rows(Path(os.environ["RLHF_DB"]), [3])[1].name.endswith(
        "[max 8 tokens, first 6, answers of run 2, judged by the reward model]")
    with Store(os.environ["RLHF_DB"]) as store:
        subset = EvalStore(store).scored_items(3)
    no_reference = [r for r in subset if not r["reference"]]
    assert len(subset) == 6 and len(no_reference) == 2
    assert metric(3, "eval/answered")[0] == (6, 6.0)  # copied: answered before its first verdict, as it shows
    full = {r["item_id"]: r["score"] for r in rows}
    assert all(r["score"] == pytest.approx(full[r["item_id"]], abs=1e-6) for r in no_reference)

    # Judged again from run 3, which answered 6 of the 10: its 6 questions, and nothing generated for the
    # other 4 (another model's settings, hours of it on the real set).
    again = rlhf_eval("belle", "--answers-from", "3", "--judge", "rm", "--reward-model", str(rm_run))
    assert again.returncode == 0, again.stderr
    assert "answers: 6 taken from run 3" in again.stdout and "to answer with" not in again.stdout
    with Store(os.environ["RLHF_DB"]) as store:
        assert sorted(i["item_id"] for i in EvalStore(store).items(4)) == sorted(r["item_id"] for r in subset)
        judged_again = EvalStore(store).scored_items(4)
    # Set against the whole set's references as run 2 was, not those of the 6 questions it took.
    assert all(r["score"] == pytest.approx(full[r["item_id"]], abs=1e-6) for r in judged_again if not r["reference"])
    # Two questions that each have a reference: nothing needs the set's mean, so the references are not all
    # scored first (minutes on the real set, for a two-question check); the scores are the full run's.
    pair = rlhf_eval("belle", "--answers-from", "2", "--limit", "2", "--judge", "rm", "--reward-model", str(rm_run))
    assert pair.returncode == 0, pair.stderr
    assert "reference answers first" not in pair.stdout and "reference answers first" in part.stdout
    with Store(os.environ["RLHF_DB"]) as store:
        two = EvalStore(store).scored_items(5)
    assert len(two) == 2 and all(r["score"] == pytest.approx(full[r["item_id"]], abs=1e-6) for r in two)

    # The judge's name carries when its model was exported: a folder exported again (a resumed RM run) is
    # another judge, whose scores are neither paired nor ranked with the first one's as if one judge's.
    from engine.config import RecipeError
    from engine.evaluate import validate_resume
    from engine.judge.reward import rm_judge_label
    from engine.lineage import read_lineage

    first_label = rm_judge_label(str(rm))
    assert re.fullmatch(rf"rm:{re.escape(str(rm))} \(exported \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC\)", first_label)
    assert {r["judge"] for r in two} == {first_label}
    lineage = read_lineage(str(rm))
    (rm / "rlhf_lineage.json").write_text(json.dumps({**lineage, "written": lineage["written"] + 3600}))
    with pytest.raises(RecipeError, match=r"run 5's verdicts so far are of .* the folder holds another export now"):
        validate_resume(config_from_run(os.environ["RLHF_DB"], 5), os.environ["RLHF_DB"], 5)
    anew = rlhf_eval("belle", "--answers-from", "2", "--limit", "2", "--judge", "rm", "--reward-model", str(rm_run))
    assert anew.returncode == 0, anew.stderr
    delta = rlhf_eval("table", "--delta", "5", "6")
    assert delta.returncode == 2 and "their scores are on different scales" in delta.stderr, delta.stderr


def test_a_blind_vote_meets_the_judge_only_on_the_question_it_was_asked(tmp_path):
    """Votes were matched to a report's items by number alone: a vote on the demo set's question 20 was set
    against the BELLE item 20's verdict."""
    from engine.eval_cli import chat_votes

    with Store(tmp_path / "runs.db") as store:
        evals = EvalStore(store)
        for item_id, asked in ((20, "“热”的反义词是什么？"), (21, "What is 2 plus 2?"), (None, "hello")):
            transcript = {side: [{"role": "user", "content": asked}, {"role": "assistant", "content": "x"}]
                          for side in ("left", "right")}
            evals.add_chat("/a", "/b", {}, transcript, blind=True, vote="right", a_is="left", item_id=item_id,
                           category="open qa" if item_id else None)
        evals.add_chat("/a", "/other", {}, {"left": [], "right": []}, blind=True, vote="left", a_is="left")
        votes = chat_votes(store, "/a", "/b", {20: "BELLE's question 20", 21: "What is 2 plus 2?"})
    assert votes == [{"result": "win", "item_id": None}, {"result": "win", "item_id": 21},
                     {"result": "win", "item_id": None}]  # the other pair's vote is not theirs


def test_pairwise_with_a_judge_that_always_prefers_the_first_slot(workdir):
    write_sample(workdir / "belle", per_class=1)
    server = JudgeServer(score_by_answer)
    env = {"THE_JUDGE_KEY": KEY}
    try:
        for name, sampling in (("a", []), ("b", ["--temperature", "2.0", "--seed", "1"])):  # b answers otherwise
            done = rlhf_eval("belle", "demo/model", "--eval-dir", "belle", *judge_args(server), "--name", name,
                             *sampling, env=env)
            assert done.returncode == 0, done.stderr
    finally:
        server.close()
    biased = JudgeServer(first_slot)
    try:
        out = rlhf_eval("pairwise", "1", "2", "--judge-url", biased.url, "--judge-model", "biased",
                        "--judge-key-env", "THE_JUDGE_KEY", env=env)
        assert out.returncode == 0, out.stderr
        assert len(biased.calls) == 20  # 10 questions, both orders
    finally:
        biased.close()
    text = out.stdout
    assert "10 items judged in both orders" in text
    # The sides by what answered them; the judge is the pairwise one (each run's own, tiny-judge, is not)
    assert f"pairwise judge: openai:biased@{biased.url}" in text and "tiny-judge" not in text, text
    assert "B = b [temperature 2 seed 1, max 12 tokens] (run 2) against A = a [max 12 tokens] (run 1)" in text, text
    itself = rlhf_eval("pairwise", "1", "1", "--judge-url", biased.url, "--judge-model", "biased",
                       "--judge-key-env", "THE_JUDGE_KEY", env=env)
    assert itself.returncode == 2 and "run 1 against itself" in itself.stderr
    for option, value, message in (("--judge-timeout", "0", "--judge-timeout: must be more than 0 seconds"),
                                   ("--concurrency", "0", "--concurrency: must be 1 or more"),
                                   ("--judge-retries", "-1", "--judge-retries: must be 0 or more")):
        bad = rlhf_eval("pairwise", "1", "2", "--judge-url", biased.url, "--judge-model", "biased",
                        "--judge-key-env", "THE_JUDGE_KEY", option, value, env=env)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr[-800:]
    # Run 1's answers judged anew (run 3): the same text on both sides is a tie without a call, and says
    # nothing of the judge's position bias.
    again = JudgeServer(score_by_answer)
    biased = JudgeServer(first_slot)
    try:
        judged = rlhf_eval("belle", "--answers-from", "1", *judge_args(again, answering=False), env=env)
        assert judged.returncode == 0, judged.stderr
        same = rlhf_eval("pairwise", "1", "3", "--judge-url", biased.url, "--judge-model", "biased",
                         "--judge-key-env", "THE_JUDGE_KEY", env=env)
        assert same.returncode == 0, same.stderr
        assert biased.calls == []
        assert "10 with identical answers are ties without a call; 0 calls to make" in same.stdout
    finally:
        again.close()
        biased.close()
    assert "10 items judged in both orders" in same.stdout
    assert "| 0.0% [0.0%, 0.0%] | 100.0% [100.0%, 100.0%] | 0.0% [0.0%, 0.0%] | - | - |" in same.stdout
    # A judge that is down (HTTP 500 on every call): no table of zeros with exit 0, but the reason, exit 1.
    down = JudgeServer(lambda body, index: ("status", 500, "upstream overloaded"))
    try:
        failed = rlhf_eval("pairwise", "1", "2", "--judge-url", down.url, "--judge-model", "other",
                           "--judge-key-env", "THE_JUDGE_KEY", "--judge-retries", "0", env=env)
    finally:
        down.close()
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "20 judge calls failed, the first: " in failed.stderr and "500" in failed.stderr
    assert "| 0.0% [0.0%, 0.0%] | 100.0% [100.0%, 100.0%] | 0.0% [0.0%, 0.0%] | 0.0% | 100.0% |" in text
    assert "below 60 %" in text


def test_runs_of_two_eval_sets_are_never_paired_and_answers_stay_with_their_questions(workdir):
    n = write_sample(workdir / "belle", per_class=1)
    write_sample(workdir / "other", per_class=1, ask="Name {k} animals with {n} legs.")  # same ids, other questions
    server = JudgeServer(score_by_answer)
    env = {"THE_JUDGE_KEY": KEY}
    try:
        for run_id, folder in enumerate(("belle", "other"), start=1):
            done = rlhf_eval("belle", "demo/model", "--eval-dir", folder, *judge_args(server), env=env)
            assert done.returncode == 0, done.stderr
            # How far it got, on the terminal and in its log: the first batch at once, the end always.
            assert re.search(rf"^\d\d:\d\d:\d\d 4 of {n} answered$", done.stdout, re.M), done.stdout
            assert re.search(rf"^\d\d:\d\d:\d\d {n} of {n} answered, {n} judged \({n} scored\)$", done.stdout,
                             re.M), done.stdout
            assert len(re.findall(rf" {n} of {n} answered$", done.stdout, re.M)) == 1  # said once, not twice
            # Its results in its folder too: every answer with its verdict, and its row of the table.
            results = Path(run_row(run_id)["output_dir"])
            lines = [json.loads(line) for line in (results / "answers.jsonl").read_text(encoding="utf-8").splitlines()]
            assert len(lines) == n and all(r["answer"] is not None and r["status"] == "scored" for r in lines)
            assert f"(evaluation run {run_id})" in (results / "scores.md").read_text(encoding="utf-8")
            assert f"results: {results / 'answers.jsonl'}, {results / 'scores.md'}" in done.stdout
        calls = len(server.calls)

        refused = {
            "delta": rlhf_eval("table", "--delta", "1", "2"),
            "pairwise": rlhf_eval("pairwise", "1", "2", "--judge-url", server.url, "--judge-model", "pj",
                                  "--judge-key-env", "THE_JUDGE_KEY", env=env),
            "answers": rlhf_eval("belle", "--answers-from", "1", "--eval-dir", "other",
                                 *judge_args(server, answering=False), env=env),
        }
        for what, result in refused.items():
            assert result.returncode == 2, (what, result.stdout, result.stderr)
            assert "hold different questions (item 1: 'What is 0 plus 4?' against 'Name 0 animals with 4 legs.')" \
                in result.stderr, (what, result.stderr)
            assert "Traceback" not in result.stderr
        assert "leave out --eval-dir" in refused["answers"].stderr
        assert len(server.calls) == calls  # nothing was paid for
        with Store(os.environ["RLHF_DB"]) as store:
            assert [r["id"] for r in store.runs()] == [1, 2]  # nothing registered

        # --answers-from without --eval-dir: the source run's own questions.
        again = rlhf_eval("belle", "--answers-from", "2", *judge_args(server, answering=False), env=env)
        assert again.returncode == 0, again.stderr
        assert f"answers: {n} taken from run 2" in again.stdout
        with Store(os.environ["RLHF_DB"]) as store:
            evals = EvalStore(store)
            assert [(i["question"], i["answer"]) for i in evals.items(3)] == \
                [(i["question"], i["answer"]) for i in evals.items(2)]
            assert store.run(3)["name"] == store.run(2)["name"]  # the same model's label
    finally:
        server.close()

    for args, message in ((["--runs", "1,x"], "--runs '1,x': give run ids separated by commas"),
                          (["--runs", "9"], "--runs: no run 9"), (["--delta", "1", "9"], "--delta: no run 9")):
        result = rlhf_eval("table", *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    bad = rlhf_eval("belle", "demo/model", "--eval-dir", "belle", "--judge", "rm", "--reward-model", "demo/model",
                    "--limit", "0", "--temperature", "-1")
    assert bad.returncode == 2 and "error: --limit: Input should be greater than 0; --temperature: " in bad.stderr
    assert "pydantic.dev" not in bad.stderr


def _reward_model_export(workdir: Path) -> Path:
    """What the rm stage exports: the tiny trunk under a one-label sequence-classification head."""
    folder = workdir / "rm-export"
    folder.mkdir()
    for item in (workdir / "demo" / "model").iterdir():
        if item.is_file():
            (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["BloomForSequenceClassification"], num_labels=1, id2label={"0": "LABEL_0"},
                  label2id={"LABEL_0": 0})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_options_an_evaluation_would_ignore_are_refused_before_anything_is_registered(workdir):
    """Each was taken and recorded as if it had counted: a label then claimed settings the run never had."""
    write_sample(workdir / "belle", per_class=1)
    cases = [
        (["demo/model", "--limit", "2", "--per-class", "1"], "--limit and --per-class: give one"),
        (["demo/model", "--judge", "rm", "--reward-model", "demo/model", "--judge-url", "http://127.0.0.1:9/v1",
          "--price-per-1k", "0.5", "--judge-timeout", "300"],
         "--judge-url, --judge-timeout, --price-per-1k: --judge rm scores with the reward model, offline"),
        (["demo/model", "--judge-timeout", "0"], "--judge-timeout: Input should be greater than 0"),
        (["demo/model", "--judge-url", "http://127.0.0.1:9/v1", "--reward-model", "demo/model"],
         "--reward-model: the judge is an endpoint (--judge openai); add --judge rm"),
        (["demo/model", "--answers-from", "1"], "checkpoint demo/model: --answers-from 1 judges that run's answers"),
        (["--answers-from", "1", "--max-new-tokens", "16", "--temperature", "0.7"],
         "--max-new-tokens, --temperature: --answers-from 1 generates nothing"),
    ]
    for args, message in cases:
        result = rlhf_eval("belle", *args, "--eval-dir", "belle")
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr[-800:])
    # Started by `accelerate launch` with two processes: said so (it was a traceback asking for rlhf launch,
    # which launches training stages only)
    ranked = rlhf_eval("belle", "demo/model", "--eval-dir", "belle", "--judge", "rm", "--reward-model", "demo/model",
                       env={"WORLD_SIZE": "2", "RANK": "0"})
    assert ranked.returncode == 2 and "Traceback" not in ranked.stderr, ranked.stderr[-800:]
    assert "error: an evaluation runs in one process (2 were started)" in ranked.stderr
    assert not Path(os.environ["RLHF_DB"]).exists()


def test_a_reward_model_is_refused_as_a_model_that_answers(workdir):
    """Chat and evaluation sample answers: a reward model's export (by folder or by its run's id) is refused
    with a reason before anything is registered; loaded as a causal LM it would write noise."""
    from engine.config import RecipeError
    from engine.evaluate import resolve_checkpoint

    folder = _reward_model_export(workdir)
    eval_dir = workdir / "belle"
    write_sample(eval_dir, per_class=1)
    with Store(os.environ["RLHF_DB"]) as store:
        run_id = store.create_run(stage="rm", name="tiny", recipe="configs/tiny.yaml", config="{}")
        (workdir / "runs" / str(run_id) / "final").symlink_to(folder)
        store.update_run(run_id, status="done", output_dir=str(workdir / "runs" / str(run_id)))
    for spec in (str(folder), str(run_id)):
        result = rlhf_eval("belle", spec, "--eval-dir", str(eval_dir), "--judge", "rm", "--reward-model", str(folder))
        assert result.returncode == 2 and "does not write answers" in result.stderr, result.stderr[-800:]
        assert "BloomForSequenceClassification" in result.stderr and "Traceback" not in result.stderr
    assert f"run {run_id} (rm)" in result.stderr
    with Store(os.environ["RLHF_DB"]) as store:
        assert [r["id"] for r in store.runs()] == [run_id]  # no evaluation run registered
    assert resolve_checkpoint(str(workdir / "demo" / "model"), os.environ["RLHF_DB"])  # a causal LM passes
    with pytest.raises(RecipeError, match="does not write answers"):
        resolve_checkpoint(str(folder), os.environ["RLHF_DB"])


def test_evaluations_of_one_checkpoint_are_told_apart_by_their_settings(tmp_path, monkeypatch):
    """Greedy against sampled, a subset, the rewrite references: each row says what sets it apart (nine
    runs of one checkpoint all read 'ppo run 3' in the table, the console and the CSV)."""
    monkeypatch.chdir(tmp_path)  # run folders go under cwd
    from engine.eval_cli import eval_rows
    from engine.evaluate import EvalConfig
    from engine.judge import Verdict

    base = dict(name="ppo run 3", checkpoint="/m", eval_dir="/e")
    settings = [{}, {"temperature": 0.9, "seed": 2}, {"limit": 20, "max_new_tokens": 64},
                {"per_class": 1, "rewrite_reference": True}, {"answers_from": 1, "temperature": 0.7, "top_p": 0.9},
                {"judge_model": "gpt-4o"}, {"judge": "rm", "reward_model": "/rm"}]
    with Store(tmp_path / "runs.db") as store:
        for extra in settings:
            run_id = store.create_run(stage="eval", name="ppo run 3", recipe="",
                                      config=EvalConfig(**base, **extra).model_dump_json())
            EvalStore(store).add_items(run_id, [{"item_id": 0, "category": "rewrite", "class": "rewrite",
                                                 "question": "q", "reference": ""}])
            EvalStore(store).set_answers(run_id, [(0, "a", 1, "eos")])
            EvalStore(store).set_judgment(run_id, 0, "judge", Verdict(0.5, "scored", "得分: 0.5"))
        store.create_run(stage="eval", name="old record", recipe="", config='{"name": "old record"}')
    names = [row.name for row in eval_rows(tmp_path / "runs.db")[1:]]
    # The --limit 20 run holds the one question there is: "first 20" would be a claim about a part of a set.
    assert names == ["ppo run 3", "ppo run 3 [temperature 0.9 seed 2]", "ppo run 3 [max 64 tokens]",
                     "ppo run 3 [1 per class, rewrite references]",
                     "ppo run 3 [temperature 0.7 top_p 0.9 seed 0, answers of run 1]", "ppo run 3 [judged by gpt-4o]",
                     "ppo run 3 [judged by the reward model]", "old record"]
    # What made each row's numbers is in the exports, whatever its label (a --name hides the checkpoint)
    import csv
    import io

    from engine.scores import render

    rows = eval_rows(tmp_path / "runs.db")
    exported = json.loads(render(rows, "json"))
    assert exported[1]["settings"]["checkpoint"] == "/m" and exported[1]["settings"]["eval_dir"] == "/e"
    assert exported[1]["questions"] == 1 and exported[-1]["settings"] is None  # the old record's are unknown
    as_csv = list(csv.DictReader(io.StringIO(render(rows, "csv"))))
    assert (as_csv[1]["checkpoint"], as_csv[1]["eval_dir"], as_csv[1]["questions"]) == ("/m", "/e", "1")
    assert as_csv[0]["rewrite n"] == "" and as_csv[1]["rewrite n"] == "1"  # the published row counts no items
    assert f"evaluation run {rows[1].run_id}: /m answering 1 question of /e, judged by judge;" in render(rows)
    # Each answered its one question "a": alike word for word, said under the table (the old record has no
    # answers to compare)
    alike = ", ".join(str(r.run_id) for r in rows[1:-1])
    assert (f"the same answer to every question: runs {alike} (their scores differ by the judge alone)"
            in render(rows))
    with Store(tmp_path / "runs.db") as store:
        EvalStore(store).set_answers(rows[1].run_id, [(0, "b", 1, "eos")])
    from engine.scores import same_answers_note

    assert same_answers_note(eval_rows(tmp_path / "runs.db")) == \
        f"the same answer to every question: runs {', '.join(str(r.run_id) for r in rows[2:-1])} (their scores " \
        "differ by the judge alone)"
    limited = EvalConfig(**base, limit=20)
    assert (limited.shown_name(20), limited.shown_name(5), limited.shown_name()) == (
        "ppo run 3 [first 20]", "ppo run 3", "ppo run 3 [first 20]")


def test_a_row_whose_checkpoint_was_written_again_after_it_answered_says_so(tmp_path, monkeypatch):
    """A PPO run extended after its evaluation exports `final` again: the row named that folder and showed
    the old model's scores as the folder's, with nothing to tell. Told by the export's lineage stamp, which
    a copy of the folder keeps (file times do not)."""
    monkeypatch.chdir(tmp_path)  # run folders go under cwd
    from engine.eval_cli import eval_rows
    from engine.evaluate import EvalConfig
    from engine.lineage import LINEAGE_FILE

    final = tmp_path / "runs" / "7" / "final"
    final.mkdir(parents=True)
    (final / LINEAGE_FILE).write_text(json.dumps({"stage": "ppo", "run_id": 7, "written": 2000.0}))
    with Store(tmp_path / "runs.db") as store:
        ids = [store.create_run(stage="eval", name="ppo run 7", recipe="", config=EvalConfig(
            name="ppo run 7", checkpoint=str(final), eval_dir="/e", checkpoint_written=written).model_dump_json())
            for written in (1000.0, 2000.0, None)]  # before the export now there; of it; recorded before stamps
    names = [row.name for row in eval_rows(tmp_path / "runs.db", ids)[1:]]
    assert names == ["ppo run 7 [its checkpoint was written again after it answered]", "ppo run 7", "ppo run 7"]


def test_a_changed_class_prompt_is_refused_on_resume_and_keeps_runs_apart_in_the_table(workdir):
    """An LLM judge reads the class prompt (eval_prompt.json): a resume after it was edited would judge one
    run on two scales (it went on, silently), and two runs judged with different prompts are not set
    against each other in the table (they were paired and ranked as one judge's)."""
    write_sample(workdir / "belle", per_class=1)
    server = JudgeServer(lambda body, index: ("status", 500, "down") if index == 2 else score_by_answer(body, index))
    env = {"THE_JUDGE_KEY": KEY}
    prompts = workdir / "belle" / "eval_prompt.json"
    try:
        first = rlhf_eval("belle", "demo/model", "--eval-dir", "belle", *judge_args(server), "--limit", "3",
                          "--concurrency", "1", "--judge-retries", "0", env=env)
        assert first.returncode == 1 and "1 of 3 judge calls failed" in first.stderr, first.stderr[-2000:]
        original = prompts.read_text(encoding="utf-8")
        prompts.write_text(original.replace("请给math类", "严格地请给math类"), encoding="utf-8")  # line 1
        refused = rlhf_eval("belle", "--resume-run", "1", env=env)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert (f"{prompts}:1: the prompt of class 'math' changed since run 1 began" in refused.stderr and
                "--answers-from 1 judges its answers with the new prompts" in refused.stderr), refused.stderr
        assert run_row(1)["status"] == "failed" and len(server.calls) == 3  # nothing claimed, nothing asked
        prompts.write_text(original, encoding="utf-8")
        resumed = rlhf_eval("belle", "--resume-run", "1", env=env)
        assert resumed.returncode == 0 and run_row(1)["status"] == "done", resumed.stderr[-2000:]
        prompts.write_text(original.replace("请给math类", "严格地请给math类"), encoding="utf-8")
        # the same answers, new prompt
        anew = rlhf_eval("belle", "--answers-from", "1", *judge_args(server, answering=False), env=env)
        assert anew.returncode == 0 and run_row(2)["status"] == "done", anew.stderr[-2000:]
    finally:
        server.close()
    delta = rlhf_eval("table", "--delta", "1", "2")
    assert delta.returncode == 2 and "were judged with different prompts for class 'math'" in delta.stderr, \
        delta.stderr
    table = rlhf_eval("table")
    assert table.returncode == 0, table.stderr
    assert ("no run is marked best: no two runs were judged by one judge with the same class prompts on the same "
            "questions") in table.stdout, table.stdout


def test_a_resume_follows_moved_eval_files_and_checks_its_checkpoint_before_the_claim(workdir):
    """The eval set's folder moved: the resume takes the new folder (held to the same questions), where it
    refused the option as one that 'would change its answers or scores'. A checkpoint gone while questions
    are left to answer is said before the run is claimed (it was claimed, then failed with a hub error)."""
    import shutil

    write_sample(workdir / "belle", per_class=1)
    model = workdir / "model-copy"
    shutil.copytree(workdir / "demo" / "model", model)
    server = JudgeServer(lambda body, index: ("status", 500, "down") if index == 0 else score_by_answer(body, index))
    env = {"THE_JUDGE_KEY": KEY}
    try:
        first = rlhf_eval("belle", str(model), "--eval-dir", "belle", *judge_args(server), "--limit", "3",
                          "--concurrency", "1", "--judge-retries", "0", env=env)
        assert first.returncode == 1 and run_row(1)["status"] == "failed", first.stderr[-2000:]
        (workdir / "belle").rename(workdir / "moved")
        gone = rlhf_eval("belle", "--resume-run", "1", env=env)
        assert gone.returncode == 2, gone.stderr
        assert (f"--eval-dir: run 1's eval folder {workdir / 'belle'} is no folder any more; if its files moved, "
                "give their folder: --eval-dir NEW") in gone.stderr
        write_sample(workdir / "other", per_class=1, ask="Name {k} animals with {n} legs.")
        other = rlhf_eval("belle", "--resume-run", "1", "--eval-dir", "other", env=env)
        assert other.returncode == 2 and "changed since run 1 began" in other.stderr, other.stderr
        segments = run_row(1)["segments"]
        import sqlite3

        with sqlite3.connect(os.environ["RLHF_DB"]) as conn:  # as a stop in the middle of answering leaves it
            conn.execute("UPDATE eval_items SET answer = NULL WHERE run_id = 1 AND item_id = 3")
        shutil.rmtree(model)
        missing = rlhf_eval("belle", "--resume-run", "1", "--eval-dir", "moved", env=env)
        assert missing.returncode == 2, missing.stderr[-2000:]
        assert missing.stderr.strip().startswith(f"error: checkpoint '{model}' is not a folder: run 1 has questions "
                                                 "still to answer with it"), missing.stderr
        assert "Traceback" not in missing.stderr
        row = run_row(1)
        assert (row["status"], row["segments"]) == ("failed", segments)  # not claimed
        shutil.copytree(workdir / "demo" / "model", model)
        resumed = rlhf_eval("belle", "--resume-run", "1", "--eval-dir", "moved", env=env)
        assert resumed.returncode == 0 and run_row(1)["status"] == "done", resumed.stderr[-2000:]
        assert f"run 1 resumes with --eval-dir {workdir / 'moved'}" in resumed.stdout
        assert json.loads(run_row(1)["config"])["eval_dir"] == str(workdir / "moved")
    finally:
        server.close()
