"""Chat with two checkpoints side by side: same prompt, same sampling settings and seed, streaming.

Each side is a generation worker process of its own (`engine.chat_worker`, over its own pipes); a worker
that dies shows its error in its pane and the other side goes on. Blind mode hides which model is which
(sides shuffled, named A and B) until a vote is cast; votes and saved exchanges go to runs.db.
"""

from __future__ import annotations

import difflib
import json
import random
import re
from dataclasses import asdict, dataclass, replace
from typing import Any, Awaitable, Callable

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Footer, Input, Label, Static

from console.chat_client import ChatWorker, ModelChoice, parse_choice
from console.messages import BelleQuestion, ChatEvent, ChatModelsResolved, ChatSaved, ChatSettingsChosen
from console.screens.dialogs import ConfirmScreen, SideBySideScreen
from console.text import terminal_safe
from console.widgets.chat_pane import ChatPane
from console.widgets.prompt_box import PromptBox
from console.worker_failures import SaysWorkerFailures

SIDES = ("left", "right")
VOTES = {"1": "A", "2": "B", "3": "tie", "4": "both bad"}


@dataclass(frozen=True)
class ChatSettings:
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    seed: int = 0
    key_env: str = "OPENAI_API_KEY"  # the variable an endpoint's key is read from (the key is never stored)

    def sampling(self, seed: int) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "max_new_tokens": self.max_new_tokens, "seed": seed}

    def line(self) -> str:
        return (f"temperature {self.temperature:g} · top_p {self.top_p:g} · top_k {self.top_k} · "
                f"max {self.max_new_tokens} tokens · seed {self.seed}")


def similarity_and_diff(a: str, b: str) -> tuple[float, Text, Text]:
    """Character-level (so Chinese diffs too): the similarity ratio, and the two answers each as it was
    written, with what only it says marked: struck through in red on `a`'s side, underlined in green on
    `b`'s (strike-through and underline still tell them apart on a terminal without colour)."""
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    left, right = Text(), Text()
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            left.append(a[i1:i2])
            right.append(b[j1:j2])
            continue
        left.append(a[i1:i2], style="strike red")
        right.append(b[j1:j2], style="underline bold green")
    return matcher.ratio(), left, right


class ChatScreen(SaysWorkerFailures, Screen[None]):
    BINDINGS = [
        Binding("escape", "leave_input", "Keys", show=False),
        # The footer's 80 columns hold Regen to Back and the app's Help; the rest is in help (tooltip: the
        # words there and in the palette, where the footer's are short).
        Binding("i", "focus_input", "Type", show=False),
        Binding("r,ctrl+r", "regenerate('both')", "Regen", tooltip="Regenerate"),
        Binding("x", "stop", "Stop", tooltip="Stop answers"),
        # The key a terminal user presses to stop output: the answers, while any is written (the box's copy
        # of a selection comes first; with none it passes the key on); else the console's quit hint.
        Binding("ctrl+c", "interrupt", "Stop answers, from the question box too", show=False),
        Binding("left_square_bracket", "regenerate('left')", "Regen left", show=False),
        Binding("right_square_bracket", "regenerate('right')", "Regen right", show=False),
        Binding("d", "diff", "Diff", show=False),
        Binding("m", "blind", "Blind"),
        Binding("1", "vote('1')", "Vote A", show=False),
        Binding("2", "vote('2')", "Vote B", show=False),
        Binding("3", "vote('3')", "Tie", show=False),
        Binding("4", "vote('4')", "Both bad", show=False),
        Binding("o", "settings", "Settings"),
        Binding("Q", "belle_question", "BELLE question", show=False),
        Binding("S,ctrl+s", "save", "Save"),
        Binding("E", "export", "Export", show=False),
        Binding("n", "new", "New chat", show=False),
        Binding("q", "close", "Back"),
        Binding("g", "app.gpus", "GPUs", show=False),
    ]

    def __init__(self, left: str, right: str | None = None, settings: ChatSettings | None = None,
                 standalone: bool = False):
        """`left`, `right`: a model folder, a run id (its export) or `openai:MODEL@URL`; `standalone`: opened
        by `rlhf chat`, so closing it ends the console."""
        super().__init__()
        self.standalone = standalone
        self.specs = {"left": left, "right": right}
        self.settings = settings or ChatSettings()
        self.choices: dict[str, ModelChoice] = {}
        self.processes: dict[str, ChatWorker] = {}
        self._workers_started = 0
        self._worker_of: dict[str, int] = {}  # side -> the number of the worker that speaks for it now
        # Each side's conversation as its worker is sent it; an answer carries the sampling it was made with.
        self.turns: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
        self.sampling_sent: dict[str, dict[str, Any]] = {}
        self.questions: list[str] = []
        self.request: dict[str, int] = {}
        self._next_id = 0
        self.regenerations = 0
        self.blind = False
        self.shown: dict[str, str] = {"A": "left", "B": "right"}  # display name -> side, blind mode only
        self.voted: str | None = None
        self.saved: str | None = None  # the transcript as last saved (S or a vote), to tell what is unsaved
        self.saved_as: tuple[int, str] | None = None  # runs.db's row for it: (chat id, its transcript)
        self.conversation = 0  # counts start-overs: a save's late answer must not name a row for the next one
        self.ready: dict[str, bool] = {}
        self.item: tuple[int, str, str] | None = None  # the BELLE question being asked (id, category, text)
        self.panes = {side: ChatPane(side, id=f"pane-{side}") for side in SIDES}

    @property
    def closed(self) -> bool:
        """Popped, or the console quits: its widgets are being taken down (mounting into them fails)."""
        return self not in self.app.screen_stack or not all(self.panes[s].body.is_attached for s in self.sides)

    @property
    def sides(self) -> tuple[str, ...]:
        return tuple(s for s in SIDES if self.specs[s])

    def compose(self) -> ComposeResult:
        with Horizontal(id="chat-panes"):
            for side in self.sides:
                yield self.panes[side]
        yield Static(Text(self.settings.line()), id="chat-settings")
        asked = "both models" if len(self.sides) == 2 else "the model"
        yield PromptBox(placeholder=f"ask {asked} (Enter; ctrl+j: a new line); Esc for keys", id="chat-input")
        yield Footer()

    def on_mount(self) -> None:
        for side in self.sides:
            self.panes[side].set_title(f"{side}: {self._label(side)}")
        self.query_one(PromptBox).focus()
        self.resolve_models()

    @work(thread=True, exclusive=True, group="chat-resolve", exit_on_error=False)
    def resolve_models(self) -> None:
        """Run ids become their export folders (engine code, off the UI thread); then the workers start. Each
        side on its own: a spec that cannot be used fails its own pane, and the other side still answers."""
        from engine.evaluate import resolve_checkpoint

        choices, errors = {}, {}
        for side in self.sides:
            spec = self.specs[side] or ""
            try:
                if spec.startswith("openai:"):
                    choices[side] = parse_choice(spec, self.settings.key_env)
                else:
                    choices[side] = ModelChoice(folder=resolve_checkpoint(spec, self.app.db_path))
            except Exception as err:  # RecipeError, StoreError: shown in that side's pane
                errors[side] = str(err)
        self.post_message(ChatModelsResolved(choices, errors))

    async def on_chat_models_resolved(self, message: ChatModelsResolved) -> None:
        if self.closed:  # left before its models were found: nothing to show, no worker to start
            return
        for side, error in message.errors.items():
            await self.panes[side].fail(error, fatal=True)
        self.choices = message.choices
        for side, choice in self.choices.items():
            self.panes[side].set_title(f"{side}: {choice.label}")
            self._start_worker(side, choice)

    def _start_worker(self, side: str, choice: ModelChoice) -> None:
        self._workers_started += 1
        started = self._workers_started  # its events carry it: a replaced worker's late events are dropped

        def post(event: dict[str, Any]) -> None:
            self.post_message(ChatEvent(side, {**event, "worker": started}))

        self.processes[side] = ChatWorker(choice, post, share=len(self.sides))
        self._worker_of[side] = started

    async def _restart_endpoints(self) -> None:
        """A new key variable reaches the endpoint sides: their workers start again with it (the key is read
        from the environment when a worker starts)."""
        for side, choice in list(self.choices.items()):
            if not choice.endpoint or choice.key_env == self.settings.key_env:
                continue
            old = self.processes.pop(side, None)
            if old is not None:
                old.close()
            self.choices[side] = replace(choice, key_env=self.settings.key_env)
            self.ready[side] = False
            await self.panes[side].revive(f"starting again with the key in ${self.settings.key_env}"
                                          if self.settings.key_env else "starting again without a key")
            self._start_worker(side, self.choices[side])
            if self.turns[side] and self.turns[side][-1]["role"] == "user":  # cut off with the old worker
                await self.panes[side].begin(None)
                self._send(side)

    # -- worker events ---------------------------------------------------------------------------------
    async def on_chat_event(self, message: ChatEvent) -> None:
        if self.closed:  # a closed screen's workers' last words
            return
        pane, event = self.panes[message.side], message.event
        kind = event.get("event")
        if event.get("worker") != self._worker_of.get(message.side):
            return  # from a worker replaced on purpose (new settings)
        if kind == "ready":
            self.ready[message.side] = True
            device = event.get("device")
            pane.idle = ("ready (an endpoint: nothing to load)" if device == "remote" else
                         f"ready on {device} (loaded in {event.get('load_s', 0):.1f} s)")
            if not pane.busy:
                pane.set_stats(pane.idle)
            return
        if kind == "exit":
            if not pane.dead:
                tail = terminal_safe(event.get("stderr", "")).strip().splitlines()[-6:]
                await pane.fail(f"the worker exited (code {event.get('code')})\n" + "\n".join(tail), fatal=True)
            return
        if event.get("id") is not None and event.get("id") != self.request.get(message.side):
            return  # an answer that was cancelled or regenerated
        if kind == "token":
            pane.add(event.get("text", ""), event.get("tokens", 0))
        elif kind == "done":
            if isinstance(event.get("text"), str):
                pane.answer = terminal_safe(event["text"]).lstrip(" ")  # decoded whole, not the joined chunks
            finish = event.get("finish")
            if finish == "cancelled":  # this request's own cancel: x stopped it (a regenerate changed the id)
                event = {**event, "finish": "stopped"}
            if finish != "cut" and (finish != "cancelled" or pane.answer):
                # A stopped answer stays as far as it got: the next question follows what the user read.
                turn = {"role": "assistant", "content": pane.answer, "sampling": self.sampling_sent.get(message.side)}
                self.turns[message.side].append(turn | ({"stopped": True} if finish == "cancelled" else {}))
            await pane.finish(event)
            if finish == "cut":
                await pane.note("the endpoint ended the stream before the answer did (no finish reason): not "
                                "kept in the conversation; r asks again")
            elif finish == "cancelled":
                await pane.note("stopped: the answer so far is kept in the conversation; r asks again"
                                if pane.answer else "stopped before its first token; r asks again")
            elif not pane.answer.strip():  # a blank pane read as a display fault, or as an answer still coming
                tokens = event.get("tokens") or 0
                await pane.note("an empty answer: the model ended it at once" if not tokens else
                                f"an answer of whitespace only ({tokens} tokens)" if pane.answer else
                                f"{tokens} tokens, none of them text"
                                + (" (the length limit ended it)" if finish == "length" else ""))
            self._after_answer()
        elif kind == "error":
            await pane.fail(event.get("message", "error"), fatal=bool(event.get("fatal")))
            self._after_answer()

    def _after_answer(self) -> None:
        if self.blind and not any(self.panes[s].busy for s in self.sides) and self.voted is None:
            self.query_one("#chat-settings", Static).update(Text(
                "blind: Esc, then 1 = A better · 2 = B better · 3 = tie · 4 = both bad", style="bold"))

    # -- asking ------------------------------------------------------------------------------------------
    def _send(self, side: str) -> None:
        self._next_id += 1
        self.request[side] = self._next_id
        seed = self.settings.seed + self.regenerations
        worker = self.processes.get(side)
        self.sampling_sent[side] = self.settings.sampling(seed)
        request = {"op": "generate", "id": self._next_id, "messages": self.turns[side],
                   "sampling": self.sampling_sent[side]}
        if worker is None or not worker.send(request):
            self.call_later(self.panes[side].fail, "no worker for this side (it did not start or has exited)")

    @on(PromptBox.Submitted, "#chat-input")
    async def ask(self, event: PromptBox.Submitted) -> None:
        await self._ask(event.value.strip(), event.box)

    async def _ask(self, question: str, box: PromptBox) -> None:
        if not question:
            return
        if any(self.panes[s].busy for s in self.sides):
            self.notify("both answers must finish first (Esc, then x stops them, r regenerates, n starts over)",
                        severity="warning")
            return
        # What came after the vote (r's answers) is in no saved row: the new exchange would throw it away.
        if self.blind and self.voted is not None and self._keep_conversation(
                "a new question after the vote starts a new blind exchange", lambda: self._ask(question, box),
                "Ask it"):
            return  # the question stays in the box
        box.clear()
        if self.blind and self.voted is not None:
            # The sides were revealed by the vote: a new blind exchange, shuffled and hidden again.
            item = self.item
            await self._new_blind_exchange()
            self.item = item
        if self.item is not None and (self.questions or question.split() != self.item[2].split()):
            self.item = None  # a vote is tied to a BELLE item only when that question opens the exchange
        elif self.item is not None:
            question = self.item[2]  # as the eval set has it, whatever spaces were edited in the box
        unanswered = [side for side in self.sides if self.turns[side] and self.turns[side][-1]["role"] == "user"]
        if unanswered and len(unanswered) < len(self.sides):
            # The two conversations part here: one side goes on without the last exchange the other has.
            name = self._side_name(unanswered[0])
            self.notify(f"{name} has no answer to the last question: its conversation goes on without that exchange, "
                        "the other's with it (r, before asking, would have asked it again)", severity="warning",
                        markup=False)
        self.questions.append(question)
        self.voted = None
        for side in self.sides:
            if self.turns[side] and self.turns[side][-1]["role"] == "user":
                self.turns[side].pop()  # a question its side never answered (an error, a cut stream): not sent on
            self.turns[side].append({"role": "user", "content": question})
            await self.panes[side].begin(question)
            self._send(side)

    async def action_regenerate(self, which: str) -> None:
        sides = self.sides if which == "both" else (which,) if which in self.sides else ()
        if not self.questions or not sides:
            return
        self.regenerations += 1
        for side in sides:
            pane = self.panes[side]
            if side in self.request:
                worker = self.processes.get(side)
                if worker is not None:
                    worker.send({"op": "cancel", "id": self.request[side]})
            if self.turns[side] and self.turns[side][-1]["role"] == "assistant":
                self.turns[side].pop()
            await pane.drop_last_answer()
            await pane.begin(None)
            self._send(side)

    def action_interrupt(self) -> None:
        if any(self.panes[side].busy for side in self.sides):
            self.action_stop()
        else:
            self.app.action_help_quit()

    def action_stop(self) -> None:
        """x: the answers being written end where they are (each worker hears it between two tokens)."""
        busy = [side for side in self.sides if self.panes[side].busy and side in self.request]
        if not busy:
            self.notify("no answer is being written", severity="information")
            return
        for side in busy:
            worker = self.processes.get(side)
            if worker is not None:
                worker.send({"op": "cancel", "id": self.request[side]})

    # -- comparing ---------------------------------------------------------------------------------------
    def action_diff(self) -> None:
        if len(self.sides) < 2:
            self.notify("one model: nothing to compare", severity="warning")
            return
        answers = {side: self.panes[side].answer for side in SIDES}
        order = ["left", "right"]
        names = ["left", "right"]
        if self.blind and self.voted is None:  # in the order the user knows them by: A, then B
            order = [self.shown["A"], self.shown["B"]]
            names = ["A", "B"]
        ratio, first, second = similarity_and_diff(answers[order[0]], answers[order[1]])
        self.app.push_screen(SideBySideScreen(
            f"{names[0]} and {names[1]}: similarity {ratio:.1%} (struck through: only in {names[0]}; underlined: "
            f"only in {names[1]})", (names[0], first), (names[1], second)))

    async def action_blind(self) -> None:
        if len(self.sides) < 2:
            self.notify("blind mode needs two models", severity="warning")
            return
        if self._keep_conversation(f"blind mode {'off' if self.blind else 'on'} starts a new chat",
                                   self.action_blind):
            return
        self.blind = not self.blind
        if self.blind:
            await self._new_blind_exchange()
        else:
            await self.action_new()
            self._titles()
        self.notify("blind mode: the models are A and B until you vote" if self.blind else "blind mode off")

    async def _new_blind_exchange(self) -> None:
        await self._start_over()
        for side in self.sides:  # where each model runs (an endpoint, a GPU, its load time) would name it
            if self.ready.get(side) and not self.panes[side].dead:
                self.panes[side].set_stats("ready")
        sides = list(SIDES)
        random.shuffle(sides)
        self.shown = {"A": sides[0], "B": sides[1]}
        self._titles()

    def _side_name(self, side: str) -> str:
        """How the user knows a side now: A or B while a blind exchange is hidden, else left or right."""
        if self.blind and self.voted is None:
            return next(name for name, shown in self.shown.items() if shown == side)
        return side

    def _label(self, side: str) -> str:
        """What answers on a side, as the user named it: a run by its id and stage (its folder's path named
        nothing a user picks by), an evaluation run by its checkpoint too; a folder or an endpoint as it is."""
        label = self.choices[side].label if side in self.choices else self.specs[side]
        spec = self.specs[side] or ""
        run = self.app.runs.get(int(spec)) if spec.isdigit() else None
        if run is None:
            return label
        if run["stage"] == "eval":  # an evaluation answers nothing itself: the model it evaluated does
            return f"eval run {spec}'s checkpoint {label}"
        return f"{run['stage']} run {spec} {run['name']}"

    def _titles(self) -> None:
        for name, side in self.shown.items():
            label = self._label(side)
            if self.blind and self.voted is None:
                self.panes[side].set_title(f"{name}")
            elif self.blind:
                self.panes[side].set_title(f"{name} = {label}")
            else:
                self.panes[side].set_title(f"{side}: {label}")
        box = self.query_one("#chat-panes")  # A (or left) is drawn on the left
        box.move_child(self.panes[self.shown["A"] if self.blind else "left"], before=0)

    def action_vote(self, key: str) -> None:
        if not self.blind or self.voted is not None or not self.questions or len(self.choices) < 2:
            return  # one vote per blind exchange, and only between two models that answered
        if any(self.panes[s].busy for s in self.sides):
            self.notify("wait for both answers", severity="warning")
            return
        if any(self.panes[s].dead or not self.turns[s] or self.turns[s][-1]["role"] != "assistant"
               for s in self.sides):
            self.notify("both models must have answered to vote", severity="warning")
            return
        choice = VOTES[key]
        self.voted = choice
        winner = self.shown.get(choice, choice)  # A / B -> the real side; tie and both bad stay
        self._titles()
        self.query_one("#chat-settings", Static).update(Text(self.settings.line()))
        self.notify(f"voted {choice}: A was {self.choices[self.shown['A']].label}", markup=False)
        self._save(self._record(vote=winner))

    def _record(self, vote: str | None = None) -> dict[str, Any]:
        return {"left": self.choices.get("left", ModelChoice(folder=self.specs["left"])).label,
                "right": (self.choices["right"].label if "right" in self.choices else (self.specs["right"] or "")),
                "settings": asdict(self.settings) | {"regenerations": self.regenerations},
                "transcript": {side: self.turns[side] for side in self.sides},
                "blind": self.blind, "vote": vote, "a_is": self.shown["A"] if self.blind else None,
                "item_id": self.item[0] if self.item else None, "category": self.item[1] if self.item else None}

    def _transcript(self) -> str:
        return json.dumps({side: self.turns[side] for side in self.sides}, sort_keys=True)

    def _save(self, record: dict[str, Any]) -> None:
        self.saved = self._transcript()
        if self.saved_as is not None and self.saved_as[1] == self.saved:
            record["replaces"] = self.saved_as[0]  # S, then the vote: one exchange, one row (with its vote)
        record["token"] = (self.conversation, self.saved)
        self.app.save_chat(record, self)

    def on_chat_saved(self, message: ChatSaved) -> None:
        conversation, transcript = message.token
        if conversation == self.conversation:
            self.saved_as = (message.chat_id, transcript)

    @property
    def unsaved(self) -> bool:
        """Questions asked since the conversation was last saved (S, or the vote that saves it)."""
        return bool(self.questions) and self._transcript() != self.saved

    def action_save(self) -> None:
        if not self.questions:
            self.notify("nothing to save yet", severity="warning")
            return
        if not self.unsaved:  # a second row of the same exchange (after its vote, say) would count it twice
            self.notify("this conversation is saved already (with its vote, if it had one)")
            return
        self._save(self._record())

    def action_export(self) -> None:
        self.app.export_chats()

    async def action_new(self) -> None:
        """n: a new chat; in blind mode a new blind exchange, shuffled and hidden again (a vote is blind only
        while the names are hidden)."""
        if self._keep_conversation("a new chat", self._new):
            return
        await self._new()

    async def _new(self) -> None:
        if self.blind:
            await self._new_blind_exchange()
        else:
            await self._start_over()

    def _keep_conversation(self, what: str, then: Callable[[], Awaitable[None]], go: str = "Start over") -> bool:
        """Whether the conversation stays because something of it is unsaved: the user is asked whether `what`
        may go on (`go`: the question's verb and its button), and `then` does it after a yes."""
        if not self.unsaved:
            return False
        asked = len(self.questions)

        async def answered(yes: bool | None) -> None:
            if yes:
                self.saved = self._transcript()  # given up: `then` must not ask again
                await then()

        self.app.push_screen(ConfirmScreen(
            f"{what}: this conversation ({asked} question{'s' if asked != 1 else ''}) is not saved and would be "
            f"gone. {go}? (n, then S saves it first)", go), answered)
        return True

    async def _start_over(self) -> None:
        for side in self.sides:
            if side in self.request and self.processes.get(side):
                self.processes[side].send({"op": "cancel", "id": self.request[side]})
            self.request.pop(side, None)
            self.turns[side] = []
            await self.panes[side].clear()
            self.panes[side].busy = False
        self.questions, self.voted, self.regenerations, self.item = [], None, 0, None
        self.saved = self.saved_as = None  # the same questions asked again are a new conversation, not saved
        self.conversation += 1

    @work(thread=True, group="chat-belle", exit_on_error=False)
    def action_belle_question(self) -> None:
        """A random question of the eval set the last evaluation run used."""
        from engine.belle import load_items
        from engine.store import Store

        with Store(self.app.db_path) as store:
            evals = [r for r in store.runs() if r["stage"] == "eval"]
        if not evals:
            self.post_message(BelleQuestion(None, None, None, "no evaluation run yet: `rlhf eval belle` names the "
                                                               "eval folder once, and the chat draws from it"))
            return
        try:
            items = load_items(json.loads(evals[-1]["config"])["eval_dir"])
        except Exception as err:  # BelleError, KeyError, OSError
            self.post_message(BelleQuestion(None, None, None, f"cannot read the eval set: {err}"))
            return
        item = random.choice(items)
        self.post_message(BelleQuestion(item.id, item.category, item.question))

    def on_belle_question(self, message: BelleQuestion) -> None:
        if message.error:
            self.notify(message.error, severity="warning", markup=False)
            return
        if self.questions:
            self.notify("start a new chat (n) to ask a BELLE question", severity="warning")
            return
        self.item = (message.item_id, message.category, message.question)
        box = self.query_one(PromptBox)
        box.set_text(message.question or "")
        box.focus()

    def action_settings(self) -> None:
        async def apply(settings: ChatSettings | None) -> None:
            if settings is not None:
                self.settings = settings
                self.query_one("#chat-settings", Static).update(Text(settings.line()))
                # To the app itself: bubbled from this screen, it was lost when the screen closed first
                self.app.post_message(ChatSettingsChosen(settings))
                await self._restart_endpoints()

        self.app.push_screen(ChatSettingsScreen(self.settings), apply)

    def action_focus_input(self) -> None:
        self.query_one(PromptBox).focus()

    def action_leave_input(self) -> None:
        self.set_focus(None)

    async def action_close(self) -> None:
        what, go = ("quitting", "Quit") if self.standalone else ("leaving the chat", "Leave")
        if self._keep_conversation(what, self._close, go):
            return
        await self._close()

    async def _close(self) -> None:
        if self.standalone:
            self.app.exit()
        else:
            self.app.pop_screen()

    def on_unmount(self) -> None:
        for worker in self.processes.values():
            worker.close()


class ChatSettingsScreen(ModalScreen["ChatSettings | None"]):
    BINDINGS = [Binding("escape", "dismiss_none", "Cancel")]
    FIELDS = ("temperature", "top_p", "top_k", "max_new_tokens", "seed", "key_env")

    def __init__(self, settings: ChatSettings):
        super().__init__()
        self.settings = settings

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Text("Sampling (both sides); Enter applies, Esc cancels", style="bold"))
            for name in self.FIELDS:  # a line each: six bordered fields ran off an 80x24 terminal
                with Horizontal(classes="row compact"):
                    yield Label(name, classes="field-label")
                    yield Input(str(getattr(self.settings, name)), id=f"set-{name}", compact=True)
            yield Static("", id="settings-error")
            with Horizontal(classes="buttons"):
                yield Button("Apply", variant="primary", id="apply")

    def _read(self) -> ChatSettings | None:
        values: dict[str, Any] = {}
        for name in self.FIELDS:
            raw = self.query_one(f"#set-{name}", Input).value.strip()
            kind = type(getattr(self.settings, name))
            try:
                values[name] = kind(raw)
            except ValueError:
                what = "a whole number" if kind is int else "a number"
                self.query_one("#settings-error", Static).update(Text(f"{name}: not {what}: {raw!r}"))
                return None
        problems = [f"{n}: {want}, not {values[n]!r}" for n, bad, want in (
            ("temperature", values["temperature"] < 0, "0 or more (0: greedy)"),
            ("top_p", not 0 < values["top_p"] <= 1, "above 0 and at most 1"),
            ("top_k", values["top_k"] < 0, "0 or more (0: no limit)"),
            ("max_new_tokens", values["max_new_tokens"] < 1, "at least 1"),
            ("key_env", bool(values["key_env"]) and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", values["key_env"]),
             "an environment variable's name (letters, digits, _), or empty for no key"))
            if bad]
        if problems:
            self.query_one("#settings-error", Static).update(Text(problems[0]))
            return None
        return replace(self.settings, **values)

    @on(Input.Submitted)
    @on(Button.Pressed, "#apply")
    def apply(self) -> None:
        settings = self._read()
        if settings is not None:
            self.dismiss(settings)

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


class ChatSidesScreen(ModalScreen["tuple[str, str | None] | None"]):
    """What each side of a chat runs, typed: a run id, a model folder or an OpenAI-compatible endpoint
    (`openai:MODEL@BASE_URL`). Starts from the runs `c` would take; Enter opens the chat, Esc cancels."""

    BINDINGS = [Binding("escape", "dismiss_none", "Cancel")]
    HINT = "a run id, a model folder, or openai:MODEL@BASE_URL"

    def __init__(self, left: str | None, right: str | None, problem: Callable[[str], str | None]):
        """`problem(spec)`: why a side cannot be opened, or None."""
        super().__init__()
        self.start, self.problem = (left or "", right or ""), problem

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Text("Chat with (Enter opens, Esc cancels; right may stay empty)", style="bold"),
                         classes="question")
            for side, value in zip(SIDES, self.start):
                with Horizontal(classes="row"):
                    yield Label(side, classes="field-label")
                    yield Input(value, placeholder=self.HINT, id=f"side-{side}")
            yield Static("", id="sides-error")

    def on_mount(self) -> None:
        # where the typing starts: the side still to be given
        self.query_one("#side-left" if not self.start[0] else "#side-right", Input).focus()

    @on(Input.Submitted)
    def open(self) -> None:
        left, right = (self.query_one(f"#side-{side}", Input).value.strip() for side in SIDES)
        for side, spec in (("left", left), ("right", right)):
            if side == "right" and not spec:
                continue
            problem = self.problem(spec)
            if problem:
                self.query_one("#sides-error", Static).update(Text(f"{side}: {problem}"))
                self.query_one(f"#side-{side}", Input).focus()
                return
        self.dismiss((left, right or None))

    def action_dismiss_none(self) -> None:
        self.dismiss(None)
