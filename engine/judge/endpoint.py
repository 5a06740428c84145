"""A judge behind any OpenAI-compatible chat-completions endpoint, through the official `openai` client.

Temperature 0; a bounded number of calls in flight; 429s, 5xx, timeouts, dropped connections and
malformed bodies retried with jittered exponential back-off (a 429's Retry-After honoured); a reply
without a score asked again once, then recorded as unscored. Every reply with a score is cached in
runs.db on the call's full input, so an unchanged re-run makes no call; one without (a wrong prompt or
model, a refusal, a proxy's page) is asked again next time rather than kept for good. The key is read
from the environment variable the user names and is never written anywhere.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any, Callable, Iterable, Iterator, Protocol, TypeVar

from engine.judge import FAILED, REFUSED, SCORED, UNSCORED, Verdict, request_key
from engine.judge.parse import parse_score
from engine.run import RunFailed

log = logging.getLogger(__name__)


MAX_WAIT_S = 120.0  # a server's Retry-After is honoured up to this
# How long a stopped evaluation waits for the judge calls in flight: each is paid for, and its verdict kept
# (and cached) is one a resume does not pay for again.
DRAIN_S = 60.0
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class JudgeSetupError(ValueError):
    pass


class Cache(Protocol):
    def get(self, key: str) -> dict[str, Any] | None: ...

    def put(self, key: str, judge: str, request: dict[str, Any], reply: str, usage: tuple[int, int]) -> None: ...


class CallFailed(RuntimeError):
    pass


class CallRefused(CallFailed):
    """The endpoint refused this call for what it holds (HTTP 400, 413, 422: a prompt over the judge's
    context, a content filter): no retry and no resume changes that, so it is the item's verdict (unscored,
    with the refusal as its reason), not a failure that keeps the run from ending."""


class JudgeRefused(RunFailed):
    """The endpoint refuses calls for a reason no retry and no other prompt changes (a bad key, no access,
    an unknown model or URL): judging stops at once rather than pay for, or wait on, every item failing."""


REFUSING = (401, 403, 404)  # the key, the permission, the model or the URL: the same for every call
ITEM_REFUSALS = (400, 413, 422)  # what one call holds (too long for the judge's context, a content filter)


class EndpointJudge:
    """Scores prompts (a judge prompt and the answer it quotes) through a chat-completions endpoint."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        key_env: str = "OPENAI_API_KEY",
        *,
        cache: Cache | None = None,
        concurrency: int = 8,
        timeout_s: float = 120.0,
        retries: int = 5,
        backoff_s: float = 1.0,
        max_tokens: int = 1024,
    ):
        import openai

        if not base_url:
            raise JudgeSetupError("--judge-url: the endpoint's base URL is required (e.g. https://api.openai.com/v1)")
        if not model:
            raise JudgeSetupError("--judge-model: the judge model's name is required")
        if key_env and not ENV_NAME.fullmatch(key_env):
            # Never echo it: a key pasted here by mistake must not reach a terminal, a log or runs.db.
            raise JudgeSetupError("--judge-key-env takes the NAME of an environment variable (such as "
                                  "OPENAI_API_KEY), not a key; put the key in that variable")
        key = os.environ.get(key_env) if key_env else "none"
        if not key:
            raise JudgeSetupError(f"--judge-key-env: the environment variable {key_env} is not set (it holds the "
                                  "endpoint's key; name another with --judge-key-env, or '' for an endpoint "
                                  "that takes none)")
        self.base_url, self.model = base_url.rstrip("/"), model
        self.cache = cache
        self.concurrency = max(1, concurrency)
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_tokens = max_tokens
        # The client's own retries are off: ours count attempts, honour Retry-After and treat a malformed
        # body like any other transient failure.
        self._client = openai.OpenAI(base_url=self.base_url, api_key=key, timeout=timeout_s, max_retries=0)
        self._openai = openai
        self._key = key
        self._stop = threading.Event()  # set by drop_in_flight: calls still running give up, not retry

    def preflight(self, timeout_s: float = 10.0) -> str | None:
        """One cheap look at the endpoint (its model list) before anything is generated for it to judge: a
        URL that cannot be reached, twice, raises JudgeSetupError (hours of answers would wait on a judge
        that cannot be reached). What the model list says otherwise is only a warning: a key may be allowed
        chat and not the list (a restricted key, a gateway that routes chat alone), and proxies list partly.
        A slow endpoint, or one without a model list, passes: its calls will tell."""
        openai = self._openai
        for attempt in range(2):  # one connection reset or DNS blip is not a wrong URL
            try:
                names = [m.id for m in self._client.with_options(timeout=timeout_s).models.list().data]
                break
            except openai.APITimeoutError:
                return None
            except openai.APIConnectionError as err:  # refused, no such host, TLS
                if attempt:
                    raise JudgeSetupError(f"--judge-url {self.base_url}: cannot be reached "
                                          f"({err.__cause__ or err})") from None
            except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
                # Its status only: a careless server's message may quote the key back.
                return (f"--judge-key-env: {self.base_url} refuses the key for its model list (HTTP "
                        f"{err.status_code}; a key allowed chat alone is refused it too)")
            except (openai.APIError, AttributeError, TypeError):
                return None
        if names and self.model not in names:
            shown = ", ".join(sorted(names)[:8]) + (", …" if len(names) > 8 else "")
            return f"--judge-model {self.model}: {self.base_url} does not list it (it lists {shown})"
        return None

    @property
    def label(self) -> str:
        return f"openai:{self.model}@{self.base_url}"

    def request(self, prompt: str) -> dict[str, Any]:
        """The full input of a call: what the cache is keyed on."""
        return {"base_url": self.base_url, "model": self.model, "temperature": 0.0, "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": prompt}]}

    def _call_once(self, request: dict[str, Any]) -> tuple[str, int | None, int | None]:
        body = {k: v for k, v in request.items() if k != "base_url"}
        response = self._client.chat.completions.create(**body)
        if isinstance(response, str):  # a body that is not JSON: the client hands over its text
            first = " ".join(response.split())[:60]
            raise CallFailed(f"malformed reply: not JSON (it begins {first!r}; is --judge-url the API's base URL, "
                             "such as https://host/v1?)")
        try:
            content = response.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            content = None
        if not isinstance(content, str):
            raise CallFailed("malformed reply: no choices[0].message.content")
        usage = getattr(response, "usage", None)  # None where the server does not report it: unknown, not 0
        prompt, completion = getattr(usage, "prompt_tokens", None), getattr(usage, "completion_tokens", None)
        return content, None if prompt is None else int(prompt), None if completion is None else int(completion)

    def _retry_after(self, err: Exception, attempt: int) -> float:
        headers = getattr(getattr(err, "response", None), "headers", None) or {}
        try:
            given = float(headers.get("retry-after", ""))
        except ValueError:
            given = 0.0
        return min(max(given, self.backoff_s * (2**attempt) * (0.5 + random.random())), MAX_WAIT_S)

    def call(self, request: dict[str, Any], calls: list[int],
             dropped: threading.Event | None = None) -> tuple[str, int | None, int | None]:
        """One reply, retrying transient failures; raises CallFailed after the last try or at once for a
        refusal of this call, JudgeRefused for one of every call (a bad key, an unknown model). `dropped`:
        the event of the batch it belongs to (drop_in_flight sets it); by default the judge's current one."""
        openai = self._openai
        dropped = dropped or self._stop
        transient = (openai.APITimeoutError, openai.APIConnectionError, openai.APIResponseValidationError,
                     CallFailed, ValueError)
        last = ""
        for attempt in range(self.retries + 1):
            if dropped.is_set():
                raise CallFailed(f"stopped ({last or 'before the first try'})")
            calls[0] += 1
            try:
                return self._call_once(request)
            except openai.APIStatusError as err:
                said = err.body.get("message") if isinstance(err.body, dict) else None
                last = self._scrub(f"HTTP {err.status_code}: {said if isinstance(said, str) else err.message}")
                if err.status_code in REFUSING:
                    raise JudgeRefused(f"the judge at {self.base_url} refused the call ({last}): check "
                                       "--judge-key-env, --judge-model and --judge-url") from None
                if err.status_code in ITEM_REFUSALS:
                    raise CallRefused(last) from None
                if err.status_code not in (408, 409, 429) and err.status_code < 500:
                    # 402 (no credit left), 405, 415...: of the account or the request's form, not of this
                    # item: a failed call, which keeps the run from ending done
                    raise CallFailed(last) from None
                error: Exception = err
            except transient as err:
                last, error = self._scrub(f"{type(err).__name__}: {err}"), err
                # No connection, nothing sent: not a call the spent line may count as paid. (By name: the
                # client's transport module is httpx in some openai releases, httpx2 in others.)
                if type(err.__cause__).__name__ in ("ConnectError", "ConnectTimeout"):
                    calls[0] -= 1
            if dropped.is_set():  # dropped on purpose (the run stopped, or its judge refused every call)
                raise CallFailed(f"stopped ({last})")
            if attempt < self.retries:
                delay = self._retry_after(error, attempt)
                log.warning("judge call failed (%s); retry %d of %d in %.1f s", last, attempt + 1, self.retries, delay)
                dropped.wait(delay)
        tries = self.retries + 1
        raise CallFailed(f"gave up after {tries} {'try' if tries == 1 else 'tries'}: {last}")

    def _scrub(self, text: str) -> str:
        """An error message with the key cut out (a server may echo it back in a 401's body)."""
        return text.replace(self._key, "***") if self._key and len(self._key) >= 8 else text

    def judge(self, prompt: str, answer: str, dropped: threading.Event | None = None) -> tuple[str, Verdict]:
        """(cache key, verdict) for one judge prompt (`dropped`: as `call`'s)."""
        request = self.request(prompt)
        key = request_key(request)
        cached = self._cached_scored(key, answer)
        if cached is not None:  # nothing spent for it here (the run that asked first paid)
            return key, self._verdict(cached["reply"], answer, 0, 0, 0)
        calls = [0]
        tokens: list[int | None] = [0, 0]
        reply = ""
        try:
            for _ in range(2):  # a reply without a score is asked again once
                reply, p, c = self.call(request, calls, dropped)
                tokens = [None if t is None or u is None else t + u for t, u in zip(tokens, (p, c))]
                if parse_score(reply, answer).score is not None:
                    break
        except CallRefused as err:
            if not reply:
                return key, Verdict(None, UNSCORED, "", f"{REFUSED}{err}", tokens[0], tokens[1], calls[0])
        except CallFailed as err:
            if not reply:
                return key, Verdict(None, FAILED, "", str(err), tokens[0], tokens[1], calls[0])
            # The second ask failed (or a stop cut it): the first reply, paid for, is the verdict (unscored)
        verdict = self._verdict(reply, answer, tokens[0], tokens[1], calls[0])
        if self.cache is not None and verdict.status == SCORED:
            self.cache.put(key, self.label, request, reply, (tokens[0], tokens[1]))
        return key, verdict

    @staticmethod
    def _verdict(reply: str, answer: str, prompt_tokens: int | None, completion_tokens: int | None,
                 calls: int) -> Verdict:
        parsed = parse_score(reply, answer)
        status = SCORED if parsed.score is not None else UNSCORED
        return Verdict(parsed.score, status, reply, parsed.problem, prompt_tokens, completion_tokens, calls)

    def _cached_scored(self, key: str, answer: str) -> dict[str, Any] | None:
        """The cached reply, if it holds a score: one without (cached before such replies stopped being
        kept) is asked again, as a fresh one would be."""
        cached = self.cache.get(key) if self.cache is not None else None
        return cached if cached is not None and parse_score(cached["reply"], answer).score is not None else None

    def cached(self, prompt: str, answer: str = "") -> bool:
        return self._cached_scored(request_key(self.request(prompt)), answer) is not None

    def judge_many(
        self, jobs: Iterable[tuple[Any, str, str]], stop: threading.Event | None = None,
    ) -> Iterator[tuple[Any, str, Verdict]]:
        """(job id, cache key, verdict) for each (job id, prompt, answer), as they complete, at most
        `concurrency` calls in flight. Once `stop` is set nothing new is started, and the calls in flight
        (paid for) are awaited for up to DRAIN_S, without retries; what is still running then is dropped."""
        # Each call holds the event of when it was started: one started just before a drop sees it set.
        calls = ((job_id, (prompt, answer, self.batch_event)) for job_id, prompt, answer in jobs)
        for job_id, future in as_completed_calls(self.judge, calls, self.concurrency, stop, self.drop_in_flight,
                                                 settle=self.no_more_tries, drain_s=DRAIN_S):
            stopping = stop is not None and stop.is_set()
            try:
                key, verdict = future.result()
            except JudgeRefused:
                if stopping:  # the run ends stopped; its resume meets the refusal first thing
                    continue
                raise
            if verdict.status == FAILED and stopping:
                continue  # a call the stop cut short (no retry): not the judge's verdict; a resume asks it
            yield job_id, key, verdict

    @property
    def batch_event(self) -> threading.Event:
        """The event that drop_in_flight sets for the calls started until then: each call is handed it."""
        return self._stop

    def no_more_tries(self) -> None:
        """The calls in flight may finish, but neither retry nor ask again (their run is stopping)."""
        self._stop.set()
        self._stop = threading.Event()  # the next calls'; each call holds the one it started with

    def drop_in_flight(self) -> None:
        """The calls still running are dropped (their caller ended early: a stop, a refusal of every call):
        they give up instead of retrying on, and the next calls get a fresh client."""
        self._stop.set()
        self._client.close()
        self._client = self._openai.OpenAI(base_url=self.base_url, api_key=self._client.api_key,
                                           timeout=self._client.timeout, max_retries=0)
        self._stop = threading.Event()  # the next calls'; each call holds the one it started with


T = TypeVar("T")


def as_completed_calls(call: Callable[..., T], jobs: Iterable[tuple[Any, tuple]], concurrency: int,
                       stop: threading.Event | None = None, abandon: Callable[[], None] | None = None,
                       settle: Callable[[], None] | None = None,
                       drain_s: float = 0.0) -> Iterator[tuple[Any, Future[T]]]:
    """(job id, its finished Future) for each (job id, args) of `jobs` as `call(*args)` completes, at most
    `concurrency` in flight. Once `stop` is set nothing new starts; the calls in flight are still yielded
    as they finish for up to `drain_s` seconds (`settle()` first: they are ending), none after. Each call
    runs in a daemon thread: one hung on a judge that never answers cannot keep the process alive after
    its run has ended (a pool's threads are joined at exit, for up to the client's timeout). Ended early
    (a stop, or the caller's own end) with calls still running: `abandon()`, and their results are dropped."""
    jobs = iter(jobs)
    running: dict[Future[T], Any] = {}

    def submit() -> bool:
        if stop is not None and stop.is_set():
            return False
        job = next(jobs, None)
        if job is None:
            return False
        job_id, args = job
        future: Future[T] = Future()

        def run() -> None:
            future.set_running_or_notify_cancel()
            try:
                future.set_result(call(*args))
            except BaseException as err:  # noqa: BLE001 - handed to whoever reads the future
                future.set_exception(err)

        threading.Thread(target=run, daemon=True, name="judge-call").start()
        running[future] = job_id
        return True

    try:
        while len(running) < concurrency and submit():
            pass
        deadline = None  # of the drain, once a stop is seen
        while running:
            done, _ = wait(list(running), timeout=0.2, return_when=FIRST_COMPLETED)
            if stop is not None and stop.is_set() and deadline is None:
                if not drain_s:
                    return
                deadline = time.monotonic() + drain_s
                if settle is not None:
                    settle()
            for future in done:
                yield running.pop(future), future
                submit()  # nothing, once stopped
            if deadline is not None and time.monotonic() > deadline:
                return
    finally:
        if running and abandon is not None:
            abandon()
