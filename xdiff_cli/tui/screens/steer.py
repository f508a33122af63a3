"""The steering chat: one prompt, the unsteered and the steered answer streaming side by side.

A shared feature is steered in both models by default, as `xdiff steer` does (one row of
panes per model); ctrl+o cycles both → A → B. Exclusive features steer their own model.
Generation runs in a thread worker (torch blocks); tokens reach the panes through
`app.call_from_thread`. Esc sets an Event that the generator polls between tokens.
"""

from __future__ import annotations

import threading
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Label, LoadingIndicator, Static

from xdiff_cli.errors import XdiffError
from xdiff_cli.findings.feature_index import Feature
from xdiff_cli.run.runs import Run
from xdiff_cli.tui.widgets.feature_detail import describe_partition
from xdiff_cli.tui.widgets.scale_input import ScaleInput, format_scale
from xdiff_cli.tui.widgets.stream_pane import StreamPane

DEFAULT_SCALE = 4.0  # α; documented in the hint line, the help screen and the README
MAX_NEW_TOKENS = 64
HINT = f"Enter runs · ↑/↓ change α (default {format_scale(DEFAULT_SCALE)}; +/- outside the prompt)"


def model_choices(feature: Feature) -> list[tuple[str, ...]]:
    """The model sets a feature can steer, the default first: both for shared, else its own."""
    if feature.partition == "shared":
        return [("a", "b"), ("a",), ("b",)]
    return [(feature.partition,)]


class SteerScreen(Screen):
    BINDINGS = [
        Binding("escape", "cancel_or_back", "Stop / back"),
        Binding("up", "nudge(1)", "α+1", show=False),
        Binding("down", "nudge(-1)", "α-1", show=False),
        Binding("plus,equals_sign", "nudge(1)", "α+1"),
        Binding("minus", "nudge(-1)", "α-1"),
        Binding("ctrl+o", "cycle_models", "Models"),  # a letter would be typed into the prompt
        Binding("ctrl+r", "generate", "Run"),
        Binding("question_mark", "app.help", "Help", show=False),
    ]

    sides: reactive[tuple[str, ...]] = reactive(("a",), init=False)
    generating: reactive[bool] = reactive(False, init=False)

    def __init__(self, run: Run, feature: Feature, view: str = "a") -> None:
        super().__init__()
        self.run, self.feature, self.view = run, feature, view
        self.cancel_event = threading.Event()
        self.steerer: Any = None  # xdiff_cli.findings.steering.Steerer, created in the worker (imports torch)
        self.last_result: Any = None
        self.results: list[Any] = []
        self.shown_scale: float | None = None  # the α of the text in the steered panes

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(self._heading(), id="steer-heading")
        with Horizontal(id="steer-inputs"):
            yield Input(placeholder="type a prompt, Enter to generate", id="prompt")
            yield Label("α", id="scale-label")
            yield ScaleInput(DEFAULT_SCALE, id="scale")
        with Horizontal(id="steer-status-row"):
            yield LoadingIndicator(id="steer-loading")
            yield Static(HINT, id="steer-status")
        for side in ("a", "b"):
            with Horizontal(id=f"steer-panes-{side}", classes="steer-panes"):
                yield StreamPane(f"model {side.upper()} unsteered", id=f"pane-{side}-baseline")
                yield StreamPane(self._steered_title(side, DEFAULT_SCALE), id=f"pane-{side}-steered",
                                 classes="steered")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.run.id
        self.query_one("#steer-loading").display = False
        self.sides = model_choices(self.feature)[0]
        self.watch_sides(self.sides)
        self.query_one("#prompt", Input).focus()

    def on_unmount(self) -> None:
        self.cancel_event.set()  # leaving the screen stops a generation still running

    def _heading(self) -> str:
        f = self.feature
        return (f"Feature {f.id} · {describe_partition(f)} · s_max {f.max_activation:.2f} · "
                f"α = 1 is its natural maximum")

    def _steered_title(self, side: str, scale: float) -> str:
        # Short enough that α stays visible in a 38-column pane at 80×24 (the feature is in the heading).
        return f"model {side.upper()} steered (α = {format_scale(scale)})"

    def pane(self, side: str, stream: str) -> StreamPane:
        return self.query_one(f"#pane-{side}-{stream}", StreamPane)

    @property
    def scale_input(self) -> ScaleInput:
        return self.query_one("#scale", ScaleInput)

    def set_status(self, message: str, *, busy: bool | None = None) -> None:
        self.query_one("#steer-status", Static).update(message)
        if busy is not None:
            self.query_one("#steer-loading").display = busy

    def watch_sides(self, sides: tuple[str, ...]) -> None:
        for side in ("a", "b"):
            self.query_one(f"#steer-panes-{side}").display = side in sides
        names = " and ".join(side.upper() for side in sides)
        choice = "  (ctrl+o: both / A / B)" if len(model_choices(self.feature)) > 1 else ""
        self.query_one("#steer-heading", Static).update(f"{self._heading()} · steering model {names}{choice}")

    # --- input -----------------------------------------------------------------------
    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_generate()

    @on(Input.Changed, "#scale")
    def _scale_changed(self, event: Input.Changed) -> None:
        scale = self.scale_input.scale
        if scale is None or self.generating:
            return
        if self.shown_scale is None:  # nothing generated yet: the titles follow α
            for side in ("a", "b"):
                self.pane(side, "steered").border_title = self._steered_title(side, scale)
        elif scale != self.shown_scale:  # the panes keep the α their text was made with
            self.set_status(f"α is now {format_scale(scale)}; the answers shown used "
                            f"{format_scale(self.shown_scale)} — Enter runs again")

    def action_nudge(self, delta: float) -> None:
        self.scale_input.nudge(delta)

    def action_cycle_models(self) -> None:
        choices = model_choices(self.feature)
        if len(choices) == 1:
            self.notify(f"Feature {self.feature.id} is {describe_partition(self.feature)}: it steers only "
                        f"model {choices[0][0].upper()}.")
            return
        if not self.generating:
            self.sides = choices[(choices.index(self.sides) + 1) % len(choices)]

    def action_generate(self) -> None:
        if self.generating:
            self.notify("Still generating — Esc stops it.", severity="warning")
            return
        prompt = self.query_one("#prompt", Input).value.strip()
        scale = self.scale_input.scale
        if not prompt:
            self.set_status("Type a prompt first.")
            return
        if scale is None:
            self.set_status("α must be a number between -10 and 10.")
            return
        self.cancel_event.clear()
        self.generating = True
        self.results = []
        for side in self.sides:
            self.pane(side, "baseline").reset()
            self.pane(side, "steered").reset(self._steered_title(side, scale))
        self.shown_scale = scale
        self.set_status("starting…", busy=True)
        self.generate(prompt, scale, self.sides)

    def action_cancel_or_back(self) -> None:
        if self.generating:
            self.cancel_event.set()
            self.set_status("stopping…")
        else:
            self.dismiss()

    # --- the worker ---------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="steer")
    def generate(self, prompt: str, scale: float, sides: tuple[str, ...]) -> None:
        call = self.app.call_from_thread
        results = []
        try:
            if self.steerer is None:
                call(self.set_status, "loading the crosscoder…")
                from xdiff_cli.findings.steering import Steerer

                self.steerer = Steerer(self.run, trust_remote_code=getattr(self.app, "trust_remote_code", False))
            features = [(self.feature.id, scale)]

            def progress(message: str) -> None:
                call(self.set_status, message)

            for side in sides:
                self.steerer.load(side, on_progress=progress)
                call(self.set_status, f"generating on model {side.upper()} ({self.steerer.model_name(side)})…")
                results.append(self.steerer.generate(
                    prompt, features, side=side, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0,
                    on_token=lambda stream, piece, side=side: call(self._append, side, stream, piece),
                    should_stop=self.cancel_event.is_set, measure=True,
                ))
                if self.cancel_event.is_set():
                    break
        except XdiffError as exc:
            call(self._finished, results, f"error: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - a failed generation must not take the UI down
            call(self._finished, results, f"error: {type(exc).__name__}: {exc}")
            return
        call(self._finished, results, None)

    def _append(self, side: str, stream: str, piece: str) -> None:
        self.pane(side, stream).append(piece)

    def _finished(self, results: list[Any], error: str | None) -> None:
        self.generating = False
        self.results = results
        self.last_result = results[-1] if results else None
        if error is not None:
            self.set_status(error, busy=False)
            return
        parts = []
        for result in results:
            # The final texts are authoritative (streamed pieces hold back partial characters).
            self.pane(result.model, "baseline").set_text(result.baseline)
            self.pane(result.model, "steered").set_text(result.steered)
            part = f"model {result.model.upper()}" + (f" layer {result.layer}" if result.layer is not None else "")
            if result.kl is not None:
                part += f" KL {result.kl:.3f} nats/token"
            parts.append(part)
        stopped = any(r.stopped for r in results)
        notes = [note for r in results for note in r.notes]
        self.set_status(" · ".join(["stopped" if stopped else "done", *parts, *notes]), busy=False)
