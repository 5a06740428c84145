"""The OpenAI-compatible judge against a loopback chat-completions server: retries, unscored replies,
failures recorded, the cache, and the key kept off disk."""

import threading
import time

import pytest

from engine.judge import FAILED, REFUSED, SCORED, UNSCORED
from engine.judge.endpoint import EndpointJudge, JudgeRefused, JudgeSetupError
from engine.store import EvalStore, Store
from tests.judge_server import JudgeServer


@pytest.fixture
def cache(tmp_path):
    with Store(tmp_path / "runs.db") as store:
        yield EvalStore(store)


def test_a_web_page_for_a_reply_is_named_as_one(cache, monkeypatch):
    """A --judge-url without its /v1 reaches a site's page: 'no choices[0].message.content' did not say so."""
    monkeypatch.setenv("JUDGE_KEY", "sk-test-secret")
    server = JudgeServer(lambda body, index: ("html",))
    try:
        judge = EndpointJudge(server.url, "judge-1", "JUDGE_KEY", cache=cache, concurrency=1, retries=0)
        ((_, _, verdict),) = list(judge.judge_many([("q", "q", "")]))
    finally:
        server.close()
    assert verdict.status == FAILED
    assert "malformed reply: not JSON (it begins '<!DOCTYPE html> <html><body>Welcome" in verdict.problem


def test_transient_failures_are_retried_and_every_outcome_recorded(cache, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test-secret")

    def script(body, index):
        prompt = body["messages"][0]["content"]
        if prompt == "always down":
            return ("status", 503)
        if prompt == "rambles":
            return ("reply", "这个回答还可以吧。")  # never a score
        return [("status", 429), ("status", 500), ("sleep", 3.0, "得分: 0.9"), ("malformed",), ("no-content",)][
            index] if index < 5 else ("reply", f"得分: 0.{len(prompt) % 10}")

    server = JudgeServer(script)
    try:
        judge = EndpointJudge(server.url, "judge-1", "JUDGE_KEY", cache=cache, concurrency=1, timeout_s=1.0,
                              retries=6, backoff_s=0.01)
        prompts = ["question one", "always down", "rambles", "question four"]
        results = {job: (key, v) for job, key, v in judge.judge_many((p, p, "") for p in prompts)}
        assert set(results) == set(prompts)  # nothing lost
        one = results["question one"][1]
        assert one.status == SCORED and one.calls == 6  # 429, 500, timeout, malformed, empty, then a reply
        assert one.score == pytest.approx(0.2) and one.reply == "得分: 0.2"
        down = results["always down"][1]
        assert down.status == FAILED and down.calls == 7 and "503" in down.problem
        rambling = results["rambles"][1]
        assert rambling.status == UNSCORED and rambling.score is None and rambling.calls == 2
        assert rambling.reply == "这个回答还可以吧。"  # stored verbatim
        assert all(k == "Bearer sk-test-secret" for k in server.keys_seen)

        before = len(server.calls)
        again = {job: v for job, _, v in judge.judge_many((p, p, "") for p in prompts)}
        # Replies with a score are cached on the call's full input; the call that never got a reply and the
        # reply without a score (a wrong prompt or model, not noise) are made again.
        assert len(server.calls) - before == 7 + 2
        assert again["question one"].calls == 0 and again["question one"].score == pytest.approx(0.2)
        assert again["rambles"].status == UNSCORED and again["rambles"].calls == 2
    finally:
        server.close()
    row = cache.get(results["question one"][0])
    assert row["reply"] == "得分: 0.2" and "sk-test-secret" not in row["request"]


@pytest.mark.parametrize("code", [400, 413, 422])
def test_a_refusal_of_one_item_is_its_verdict_not_retried(cache, monkeypatch, code):
    """A prompt too long for the judge, a content filter: no retry or resume changes it, so the item is
    unscored with the refusal as its reason (a failed call kept its run from ever ending), nothing cached."""
    monkeypatch.setenv("JUDGE_KEY", "k")
    server = JudgeServer(lambda body, index: ("status", code, "this prompt is too long"))
    try:
        judge = EndpointJudge(server.url, "m", "JUDGE_KEY", cache=cache, retries=5, backoff_s=0.01)
        key, verdict = judge.judge("p", "")
        assert verdict.status == UNSCORED and verdict.calls == 1 and verdict.reply == ""
        assert verdict.problem == f"{REFUSED}HTTP {code}: this prompt is too long"
        assert cache.get(key) is None
    finally:
        server.close()


@pytest.mark.parametrize("code", [402, 405])
def test_a_refusal_of_the_account_or_the_request_form_is_a_failed_call_not_an_items_verdict(cache, monkeypatch, code):
    """402 (no credit left midway) is of every call from then on: counted as the item's verdict (unscored),
    it would end the run done with a mean over the items judged before the money ran out."""
    monkeypatch.setenv("JUDGE_KEY", "k")
    server = JudgeServer(lambda body, index: ("status", code, "Insufficient Balance"))
    try:
        judge = EndpointJudge(server.url, "m", "JUDGE_KEY", cache=cache, retries=5, backoff_s=0.01)
        _, verdict = judge.judge("p", "")
        assert verdict.status == FAILED and verdict.calls == 1  # not retried: it would not change
        assert verdict.problem == f"HTTP {code}: Insufficient Balance"
    finally:
        server.close()


def test_a_try_that_never_connected_is_not_counted_as_a_call(cache, monkeypatch):
    """An endpoint gone mid-run (a refused connection): nothing was sent, so nothing was paid; the spent line
    summed every try as a call. A try that reached the server counts (test above)."""
    import socket

    monkeypatch.setenv("JUDGE_KEY", "k")
    with socket.socket() as bound:  # bound, never listening: connections to it are refused, the port kept
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        judge = EndpointJudge(f"http://127.0.0.1:{port}/v1", "m", "JUDGE_KEY", cache=cache, retries=2,
                              backoff_s=0.01)
        _, verdict = judge.judge("p", "")
    assert verdict.status == FAILED and verdict.calls == 0
    assert verdict.problem == "gave up after 3 tries: APIConnectionError: Connection error."


@pytest.mark.parametrize("code", [401, 403, 404])
def test_a_refusal_of_every_call_stops_judging_at_once(cache, monkeypatch, code):
    """A bad key, no access, an unknown model: each of 1,000 items would fail the same way."""
    monkeypatch.setenv("JUDGE_KEY", "k")
    server = JudgeServer(lambda body, index: ("status", code))
    try:
        judge = EndpointJudge(server.url, "m", "JUDGE_KEY", cache=cache, concurrency=2, retries=5, backoff_s=0.01)
        with pytest.raises(JudgeRefused, match=f"refused the call \\(HTTP {code}"):
            list(judge.judge_many((i, f"p{i}", "") for i in range(50)))
        assert len(server.calls) <= 3  # what was in flight, not 50
    finally:
        server.close()


@pytest.mark.parametrize("answered", [True, False], ids=["answered in time", "hung past the wait"])
def test_a_stop_waits_for_the_calls_in_flight_and_starts_nothing_new(cache, monkeypatch, answered):
    """A call in flight at a stop is paid for: its verdict is awaited and kept (it was dropped, and a resume
    paid for it again), for `DRAIN_S` at most; nothing new starts."""
    import engine.judge.endpoint

    monkeypatch.setenv("JUDGE_KEY", "k")
    monkeypatch.setattr(engine.judge.endpoint, "DRAIN_S", 60.0 if answered else 0.5)
    release = threading.Event()

    def script(body, index):
        if index >= 2:
            release.wait(30)  # calls after the first two hang until released
        return ("reply", "得分: 1")

    server = JudgeServer(script)
    stop = threading.Event()
    try:
        judge = EndpointJudge(server.url, "m", "JUDGE_KEY", cache=cache, concurrency=2, backoff_s=0.01)
        got = []
        for job, _, verdict in judge.judge_many(((i, f"p{i}", "") for i in range(10)), stop):
            got.append(job)
            assert verdict.status == SCORED
            if len(got) == 2:
                stop.set()
                if answered:
                    release.set()  # the call in flight answers after the stop
        # The third call had started when the stop came; no other starts after it.
        assert sorted(got) == ([0, 1, 2] if answered else [0, 1])  # as they complete: 0 and 1 in either order
        # (hung: it may not have reached the server yet, on a busy machine)
        assert len(server.calls) == 3 if answered else len(server.calls) <= 3
        assert answered or not release.is_set()  # returned without it: dropped after the wait
    finally:
        release.set()
        server.close()


def test_a_reply_in_flight_at_a_stop_is_kept_even_without_a_score(cache, monkeypatch):
    """A reply without a score is asked again once; a stop cuts that second ask: the first reply, paid for,
    is the verdict (it was a failed call, dropped, its spend uncounted)."""
    monkeypatch.setenv("JUDGE_KEY", "k")
    go = threading.Event()

    def script(body, index):
        go.wait(30)
        return ("reply", "这个回答还可以吧。")  # never a score

    server = JudgeServer(script)
    stop = threading.Event()

    def stop_once_asked() -> None:
        while not server.calls:
            time.sleep(0.01)
        stop.set()
        go.set()

    threading.Thread(target=stop_once_asked, daemon=True).start()
    try:
        judge = EndpointJudge(server.url, "m", "JUDGE_KEY", cache=cache, concurrency=1, backoff_s=0.01)
        got = list(judge.judge_many([(0, "p0", "")], stop))
    finally:
        go.set()
        server.close()
    assert [(job, verdict.status, verdict.reply) for job, _, verdict in got] == [(0, UNSCORED, "这个回答还可以吧。")]
    assert got[0][2].calls == len(server.calls)  # every call made is counted


def test_setup_errors_name_the_option(monkeypatch):
    monkeypatch.delenv("NOPE_KEY", raising=False)
    with pytest.raises(JudgeSetupError, match="--judge-key-env: the environment variable NOPE_KEY is not set"):
        EndpointJudge("http://127.0.0.1:1/v1", "m", "NOPE_KEY")
    with pytest.raises(JudgeSetupError, match="--judge-url"):
        EndpointJudge("", "m", "")
    with pytest.raises(JudgeSetupError, match="takes the NAME of an environment variable") as err:
        EndpointJudge("http://127.0.0.1:1/v1", "m", "sk-live-0123456789abcdef")  # a key pasted by mistake
    assert "sk-live" not in str(err.value)


def test_a_key_echoed_back_by_the_server_is_not_recorded(cache, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-echoed-secret-42")
    server = JudgeServer(lambda body, index: ("status", 401, "echo the key"))
    try:
        judge = EndpointJudge(server.url, "m", "JUDGE_KEY", cache=cache, retries=0, backoff_s=0.01)
        with pytest.raises(JudgeRefused) as refused:
            judge.judge("p", "")
        assert "invalid key" in str(refused.value)
        assert "sk-echoed" not in str(refused.value) and "***" in str(refused.value)
    finally:
        server.close()


def test_pairwise_stops_at_a_refusal_of_every_call_too(cache, monkeypatch):
    from engine.pairwise import judge_pairs

    monkeypatch.setenv("JUDGE_KEY", "k")
    server = JudgeServer(lambda body, index: ("status", 403))
    try:
        judge = EndpointJudge(server.url, "m", "JUDGE_KEY", cache=cache, concurrency=2, retries=5, backoff_s=0.01)
        with pytest.raises(JudgeRefused, match="HTTP 403"):
            list(judge_pairs(judge, (((i, "a"), f"p{i}") for i in range(100))))
        assert len(server.calls) <= 4  # the calls in flight, not 100
    finally:
        server.close()


def test_a_cached_reply_without_a_score_or_a_winner_is_asked_again(cache, monkeypatch):
    """A runs.db from before such replies stopped being cached holds some: read back, they would make a
    resume "re-judge" an unscored item from the cache, for ever."""
    from engine.judge import request_key
    from engine.pairwise import cached_verdict, judge_pairs

    monkeypatch.setenv("JUDGE_KEY", "k")
    server = JudgeServer(lambda body, index: ("reply", "得分: 0.9\n结论: 回答一"))
    try:
        judge = EndpointJudge(server.url, "m", "JUDGE_KEY", cache=cache, retries=0, backoff_s=0.01)
        for prompt in ("grade this", "which is better"):
            request = judge.request(prompt)
            cache.put(request_key(request), judge.label, request, "I cannot grade this.", (3, 4))
        assert not judge.cached("grade this") and cached_verdict(judge, "which is better") is None
        _, verdict = judge.judge("grade this", "")
        assert verdict.status == SCORED and verdict.score == 0.9 and len(server.calls) == 1
        [(_, _, winner, _)] = list(judge_pairs(judge, [((1, "a"), "which is better")]))
        assert winner is not None and len(server.calls) == 2
        assert judge.cached("grade this") and cached_verdict(judge, "which is better") is not None  # now kept
    finally:
        server.close()
