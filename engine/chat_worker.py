"""A generation worker for the chat pane: one model, loaded once, answering over its own pipes.

    python -m engine.chat_worker --model FOLDER
    python -m engine.chat_worker --endpoint URL --endpoint-model NAME [--key-env VAR]

It reads JSON lines on stdin and writes JSON lines on stdout; nothing listens on any socket, so only the
process that started it (the console) can drive it. Requests:

    {"op": "generate", "id": 7, "messages": [{"role": "user", "content": "..."}, ...],
     "sampling": {"temperature": 0.7, "top_p": 1.0, "top_k": 0, "max_new_tokens": 256, "seed": 0}}
    {"op": "cancel", "id": 7}
    {"op": "quit"}

Events: {"event": "ready", "model": ..., "device": ..., "load_s": ...} once; then per request any number of
{"event": "token", "id": 7, "text": "..."}, and one {"event": "done", "id": 7, "tokens": n, "ttft_s": ...,
"seconds": ..., "pieces": the token events that carried it, "finish": "eos" | "length" | "cancelled" | "cut"}
or {"event": "error", "id": 7, "message": ...}.
A model that cannot load sends {"event": "error", "fatal": true, "message": ...} and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterator

from engine.template import Turn

_out_lock = threading.Lock()


def emit(event: dict[str, Any]) -> None:
    with _out_lock:
        sys.stdout.write(json.dumps(event, ensure_ascii=False) + "\n")
        sys.stdout.flush()


def whole_reply(body: bytes) -> tuple[str, str | None, int | None]:
    """(text, finish, completion tokens) of a reply sent whole to a request for a stream, read as leniently
    as the client reads a plain completion (servers that do not stream are seldom strict about the rest):
    a chat completion's JSON (whole by being sent whole: its finish is "eos" unless it says "length"), or
    server-sent events under a wrong content type (then a missing finish reason is a cut stream)."""
    text = body.decode("utf-8", errors="replace")
    if text.lstrip().startswith("{"):
        reply = json.loads(text)
        choice = (reply.get("choices") or [{}])[0]
        content = (choice.get("message") or {}).get("content") or ""
        tokens = (reply.get("usage") or {}).get("completion_tokens")
        return content, "length" if choice.get("finish_reason") == "length" else "eos", tokens
    parts, finish, tokens = [], None, None
    for line in text.splitlines():
        data = line[5:].strip() if line.startswith("data:") else ""
        if not data or data == "[DONE]":
            continue
        event = json.loads(data)
        tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
        for choice in event.get("choices") or []:
            parts.append((choice.get("delta") or {}).get("content") or "")
            if choice.get("finish_reason"):
                finish = "length" if choice["finish_reason"] == "length" else "eos"
    return "".join(parts), finish, tokens


class LocalModel:
    """A Hugging Face folder through the generation engine, multi-turn with the chat template."""

    def __init__(self, folder: str):
        import torch

        from engine.generation import Engine
        from engine.models import folder_tokenizer, inference_model

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.engine = Engine(inference_model(folder, device), folder_tokenizer(folder))
        self.device = device
        self.label = folder

    def answer(self, turns: list[Turn], sampling: dict[str, Any],
               cancelled: Callable[[], bool]) -> Iterator[Any]:
        from engine.generation import Sampling
        from engine.template import check_conversation, tokenize_conversation

        check_conversation(turns, ends_with="user")
        ids = tokenize_conversation(self.engine.tokenizer, turns)["input_ids"]  # piecewise, as in training
        yield from self.engine.stream(ids, Sampling(**sampling), cancelled)


class EndpointModel:
    """An OpenAI-compatible chat-completions endpoint, streamed; its key comes from an environment variable."""

    def __init__(self, url: str, model: str, key_env: str):
        import openai

        key = os.environ.get(key_env) if key_env else "none"
        if not key:
            raise ValueError(f"the environment variable {key_env} (the endpoint's key) is not set: export it, or "
                             "give the variable that holds the key: key_env in the chat's settings (o), or rlhf "
                             "chat --key-env VAR; leave it empty for an endpoint that takes no key")
        self.client = openai.OpenAI(base_url=url, api_key=key, max_retries=2, timeout=120)
        self.model = model
        self.url = url
        self.device = "remote"
        self.label = f"{model}@{url}"
        self.usage = True  # ask for the usage chunk until the server refuses it

    def answer(self, turns: list[Turn], sampling: dict[str, Any],
               cancelled: Callable[[], bool]) -> Iterator[Any]:
        import openai

        from engine.pieces import Piece

        # top_k is not part of the chat-completions protocol; temperature, top_p, seed and the length are.
        request = dict(model=self.model, messages=[{"role": t.role, "content": t.content} for t in turns],
                       stream=True, temperature=sampling["temperature"], top_p=sampling["top_p"],
                       max_tokens=sampling["max_new_tokens"], seed=sampling["seed"])
        # The call runs in a thread of its own: a stop must end the answer at once, also while the server
        # has sent nothing yet (a queue before the first token can take minutes), not at its next chunk.
        # Left behind, the thread ends with its call.
        chunks_in: queue.Queue[tuple[str, Any]] = queue.Queue()
        left = threading.Event()
        # A connection of its own, closed on a stop: the client's retries then fail at once instead of
        # sending the stopped question again (asked again at the server, and paid for). A read already
        # waiting on the socket may still wait for the server's next bytes; nobody reads them.
        http = openai.DefaultHttpxClient()
        client = self.client.with_options(http_client=http)
        threading.Thread(target=self._pump, args=(client, request, chunks_in, left), daemon=True).start()
        # Until the usage chunk says otherwise, a stream chunk counts as one token, as it is for most servers.
        chunks, tokens, finish = 0, None, None
        text = []
        try:
            while True:
                try:
                    kind, chunk = chunks_in.get(timeout=0.05)
                except queue.Empty:
                    if cancelled():
                        break
                    continue
                if kind == "error":
                    if isinstance(chunk, openai.APIConnectionError):  # "Connection error." names nothing
                        raise ConnectionError(f"no answer from {self.url}: {chunk}") from chunk
                    raise chunk
                if kind == "end" or cancelled():
                    break
                if kind == "whole":
                    content, finish, tokens = chunk
                    if content:
                        chunks += 1
                        text.append(content)
                        yield Piece(content, chunks)
                    continue
                if getattr(chunk, "usage", None) and chunk.usage.completion_tokens is not None:
                    tokens = chunk.usage.completion_tokens
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                if choice.finish_reason:
                    finish = "length" if choice.finish_reason == "length" else "eos"
                if choice.delta and choice.delta.content:
                    chunks += 1
                    text.append(choice.delta.content)
                    yield Piece(text[-1], chunks)
        finally:
            left.set()
            http.close()
        if finish is None and not cancelled():
            finish = "cut"  # the stream ended (a dropped connection, a proxy's timeout) before the answer did
        yield Piece("".join(text), chunks if tokens is None else tokens, final=True, finish=finish)

    def _pump(self, client: Any, request: dict[str, Any], out: queue.Queue, left: threading.Event) -> None:
        """Stream one answer's chunks into `out`, then ("end", None), or ("error", exception); it stops reading
        once the answer is `left`."""
        import openai

        try:
            stream = None
            if self.usage:  # the true token count, in a last chunk of its own; servers that predate it refuse it
                try:
                    stream = client.chat.completions.create(**request, stream_options={"include_usage": True})
                except openai.BadRequestError as err:
                    if "stream_options" not in str(err):
                        raise
                    self.usage = False
            if stream is None:
                stream = client.chat.completions.create(**request)
            with stream:
                if stream.response.headers.get("content-type", "").startswith("application/json"):
                    # A server (or a proxy before it) that answers a stream with the whole reply at once: the
                    # stream's parser finds no event in it, and a complete answer would read as cut.
                    out.put(("whole", whole_reply(stream.response.read())))
                else:
                    for chunk in stream:
                        if left.is_set():
                            return
                        out.put(("chunk", chunk))
            out.put(("end", None))
        except Exception as err:  # noqa: BLE001 - raised again in the answer's own thread
            out.put(("error", err))


def serve(model: Any) -> None:
    """Answer requests one at a time; a cancel or quit is read while an answer streams."""
    requests: queue.Queue[dict[str, Any] | None] = queue.Queue()
    cancelled: set[int] = set()

    def read() -> None:
        for line in sys.stdin:
            try:
                request = json.loads(line)
            except ValueError:
                emit({"event": "error", "message": f"not a JSON request: {line[:80]!r}"})
                continue
            if request.get("op") == "cancel":
                cancelled.add(request.get("id"))
            elif request.get("op") == "quit":
                break
            else:
                requests.put(request)
        requests.put(None)  # stdin closed: the console is gone

    threading.Thread(target=read, daemon=True).start()
    while (request := requests.get()) is not None:
        rid = request.get("id")
        if rid in cancelled:
            emit({"event": "done", "id": rid, "tokens": 0, "ttft_s": None, "seconds": 0.0, "finish": "cancelled"})
            continue
        try:
            turns = [Turn(m["role"], m["content"]) for m in request["messages"]]
            sampling = {k: request["sampling"][k] for k in ("temperature", "top_p", "top_k", "max_new_tokens", "seed")}
            start = time.perf_counter()
            first = None
            tokens, pieces, whole, said = 0, 0, "", None
            for piece in model.answer(turns, sampling, lambda: rid in cancelled):
                tokens = piece.tokens
                if piece.final:
                    whole, said = piece.text, piece.finish
                    break
                if first is None:
                    first = time.perf_counter() - start
                pieces += 1
                emit({"event": "token", "id": rid, "text": piece.text, "tokens": tokens})
            seconds = time.perf_counter() - start
            finish = "cancelled" if rid in cancelled else (
                said or ("length" if tokens >= sampling["max_new_tokens"] else "eos"))
            # The whole answer decoded at once: what the transcript keeps and the next turn sends back.
            emit({"event": "done", "id": rid, "tokens": tokens, "pieces": pieces, "ttft_s": first,
                  "seconds": seconds, "finish": finish, "text": whole})
        except Exception as err:  # noqa: BLE001 - reported to the pane, the worker goes on
            traceback.print_exc(file=sys.stderr)
            emit({"event": "error", "id": rid, "message": f"{type(err).__name__}: {err}"})


# A worker ends with the console that started it. A console that quits asks its workers to, but one blocked
# in a slow endpoint call hears that only when the call returns (minutes, with retries), and a console that
# crashes or is killed asks nothing: the kernel ends the worker with its parent instead.
PARENT_ENV = "RLHF_CHAT_PARENT"  # the console's pid, set for the worker it starts (from its UI thread)


def end_with_console() -> None:
    from engine.procs import end_with_parent

    parent = os.environ.get(PARENT_ENV)
    if parent:
        end_with_parent(int(parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.chat_worker")
    parser.add_argument("--model", help="a Hugging Face model folder")
    parser.add_argument("--endpoint", help="base URL of an OpenAI-compatible endpoint")
    parser.add_argument("--endpoint-model", help="the model's name at that endpoint")
    parser.add_argument("--key-env", default="OPENAI_API_KEY", help="environment variable with the endpoint's key")
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="torch threads on a CPU: workers that share the cores must split them, or their "
                             "threads spin against each other")
    args = parser.parse_args(argv)
    end_with_console()
    start = time.perf_counter()
    if args.cpu_threads and args.model:
        import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(args.cpu_threads)
    try:
        if args.endpoint:
            model: Any = EndpointModel(args.endpoint, args.endpoint_model or "", args.key_env)
        elif args.model:
            model = LocalModel(args.model)
        else:
            raise ValueError("give --model FOLDER or --endpoint URL --endpoint-model NAME")
    except Exception as err:  # noqa: BLE001 - the console shows it in the pane
        traceback.print_exc(file=sys.stderr)
        emit({"event": "error", "fatal": True, "message": f"cannot load: {type(err).__name__}: {err}"})
        return 1
    emit({"event": "ready", "model": model.label, "device": model.device, "load_s": time.perf_counter() - start})
    serve(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
