"""A chat-completions server on loopback that speaks the OpenAI protocol (JSON replies and SSE streams),
driven by a script, for the judge and chat tests. It stands in for a paid judge API only: the client on
the other side is the real `openai` package over real HTTP."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

# What the server does with a call: ("reply", text) | ("status", code[, message]) | ("sleep", seconds, text)
# | ("malformed",) | ("html",): a web page | ("no-content",) | ("no-usage", text): a reply that does not
# report its tokens
# | ("cut", text): streamed, then the connection closes with no finish reason and no [DONE] (a dropped
# connection, a proxy's timeout) | ("whole", text): a stream asked for, the whole reply sent as one JSON body
# (a server or proxy that does not stream)
Action = tuple


@dataclass
class JudgeServer:
    script: Callable[[dict[str, Any], int], Action]
    refuses_stream_options: bool = False  # as servers that predate `stream_options` do
    models: list[str] | None = None  # what GET /v1/models lists; None: no such route (404), as on some servers
    models_refused: bool = False  # GET /v1/models answers 401, as for a key allowed chat alone
    calls: list[dict[str, Any]] = field(default_factory=list)
    keys_seen: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.rstrip("/").endswith("/models") and server.models_refused:
                    self._send(401, json.dumps({"error": {"message": "missing scope: api.model.read",
                                                          "type": "invalid_request_error"}}).encode())
                elif self.path.rstrip("/").endswith("/models") and server.models is not None:
                    listed = [{"id": name, "object": "model", "created": 0, "owned_by": "test"}
                              for name in server.models]
                    self._send(200, json.dumps({"object": "list", "data": listed}).encode())
                else:
                    self._send(404, json.dumps({"error": {"message": f"no route {self.path}",
                                                          "type": "not_found"}}).encode())

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    index = len(server.calls)
                    server.calls.append(body)
                    server.keys_seen.append(self.headers.get("Authorization", ""))
                action = server.script(body, index)
                kind = action[0]
                if kind == "status":
                    message = action[2] if len(action) > 2 else f"scripted {action[1]}"
                    if message == "echo the key":  # what a careless server does with a bad key
                        message = f"invalid key: {self.headers.get('Authorization', '')}"
                    self._send(action[1], json.dumps({"error": {"message": message,
                                                                "type": "server_error"}}).encode())
                    return
                if kind == "sleep":
                    time.sleep(action[1])
                    action = ("reply", action[2])
                if kind == "html":  # a web page where the API was meant: a --judge-url without its /v1
                    self._send(200, b"<!DOCTYPE html>\n<html><body>Welcome</body></html>", "text/html")
                    return
                if kind == "malformed":
                    self._send(200, b'{"id": "x", "choices": [{"index": 0, "mess')
                    return
                if kind == "no-content":
                    self._send(200, json.dumps({"id": "x", "object": "chat.completion", "created": 0,
                                                "model": body["model"], "choices": []}).encode())
                    return
                text = action[1]
                if body.get("stream") and "stream_options" in body and server.refuses_stream_options:
                    self._send(400, json.dumps({"error": {"message": "unknown field: stream_options",
                                                          "type": "invalid_request_error"}}).encode())
                    return
                if body.get("stream") and kind != "whole":
                    self._stream(body, text, cut=kind == "cut")
                    return
                reply = {
                    "id": f"chatcmpl-{index}", "object": "chat.completion", "created": int(time.time()),
                    "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": len(body["messages"][-1]["content"]), "completion_tokens": len(text),
                              "total_tokens": len(body["messages"][-1]["content"]) + len(text)},
                }
                if kind == "no-usage":
                    del reply["usage"]
                self._send(200, json.dumps(reply, ensure_ascii=False).encode())

            def _send(self, code: int, payload: bytes, content_type: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _stream(self, body: dict[str, Any], text: str, cut: bool = False) -> None:
                """Three characters a chunk; a character is a token (what `usage` counts)."""
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                finish = "stop"
                if body.get("max_tokens") is not None and len(text) > body["max_tokens"]:
                    text, finish = text[: body["max_tokens"]], "length"
                for k in range(0, len(text), 3):
                    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "delta": {"content": text[k : k + 3]}, "finish_reason": None}]}
                    self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
                    self.wfile.flush()
                if cut:
                    return  # HTTP/1.0: the connection closes here
                done = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
                self.wfile.write(f"data: {json.dumps(done)}\n\n".encode())
                if (body.get("stream_options") or {}).get("include_usage"):
                    prompt = len(body["messages"][-1]["content"])
                    usage = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                             "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": len(text),
                                                      "total_tokens": prompt + len(text)}}
                    self.wfile.write(f"data: {json.dumps(usage)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()

        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def score_by_answer(body: dict[str, Any], index: int) -> Action:
    """A judge that scores an answer by its length (deterministic) and gives a reason."""
    prompt = body["messages"][-1]["content"]
    answer = prompt.split("模型回答：", 1)[-1]
    score = round((len(answer) % 11) / 10, 1)
    return ("reply", f"得分: {score}\n理由: 回答长度为{len(answer)}。")


def first_slot(body: dict[str, Any], index: int) -> Action:
    """A pairwise judge that always prefers whatever comes first."""
    return ("reply", "两个回答各有优点，但第一个更完整。\n结论: 回答一")


def hanging_at(call: int, release: threading.Event) -> Callable[[dict[str, Any], int], Action]:
    """`score_by_answer`, except that call number `call` (from 0) waits for `release` first (at most 60 s):
    a run can be stopped or killed while it waits."""

    def script(body: dict[str, Any], index: int) -> Action:
        if index == call:
            release.wait(60)
        return score_by_answer(body, index)

    return script
