"""What the console writes beside runs.db: the chats and the score table, in `exports/`, for their owner
only (as runs.db is)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def write_private(folder: Path, files: dict[str, str]) -> list[Path]:
    """Each `name: text` written into `folder` (made if missing), readable by its owner alone."""
    if folder.exists() and not folder.is_dir():
        raise OSError(f"cannot export into {folder}: it is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = []
    for name, text in files.items():
        path = folder / name
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))  # created private before any text is in it
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def export_chats(chats: list[dict[str, Any]], folder: Path) -> tuple[Path, Path]:
    """Every stored exchange as Markdown and as JSON Lines; returns the two files."""
    records, lines = [], []
    for chat in chats:
        transcript = json.loads(chat["transcript"])
        record = {**chat, "transcript": transcript, "settings": json.loads(chat["settings"])}
        records.append(json.dumps(record, ensure_ascii=False) + "\n")
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(chat["created"]))
        lines.append(f"## chat {chat['id']} ({when})\n")
        vote = f", vote: {chat['vote']}" if chat["vote"] else ""
        models = (f"left: `{chat['left_model']}`, right: `{chat['right_model']}`" if chat["right_model"]
                  else f"model: `{chat['left_model']}`")  # a chat with one model has no right side
        lines.append(f"{models}{', blind' if chat['blind'] else ''}{vote}\n")
        for side, turns in transcript.items():
            lines.append(f"### {side}\n")
            for turn in turns:
                who = "**user**" if turn["role"] == "user" else "**assistant**"
                lines.append(f"{who}: {turn['content']}{' *(stopped)*' if turn.get('stopped') else ''}\n")
    md, jsonl = write_private(folder, {"chats.md": "\n".join(lines), "chats.jsonl": "".join(records)})
    return md, jsonl


def export_scores(db_path: Path, folder: Path) -> tuple[Path, Path]:
    """The score table as Markdown and as CSV; returns the two files."""
    from engine.eval_cli import eval_rows
    from engine.scores import render

    rows = eval_rows(db_path)
    md, csv = write_private(folder, {"scores.md": render(rows, "md"), "scores.csv": render(rows, "csv")})
    return md, csv
