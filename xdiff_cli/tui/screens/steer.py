"""The steering chat: one prompt, the unsteered and the steered answer streaming side by side.

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
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Label, LoadingIndicator, Static

from xdiff_cli.errors import XdiffError
from xdiff_cli.feature_index import Feature
from xdiff_cli.runs import Run
from xdiff_cli.tui.widgets.feature_detail import describe_partition
from xdiff_cli.tui.widgets.scale_input import ScaleInput, format_scale
from xdiff_cli.tui.widgets.stream_pane import StreamPane

DEFAULT_SCALE = 4.0
MAX_NEW_TOKENS = 64


class SteerScreen(Screen):
    BINDINGS = [
        Binding("escape", "cancel_or_back", "Stop / back"),
        Binding("plus,equals_sign", "nudge(1)", "α+1"),
        Binding("minus", "nudge(-1)", "α-1"),
        Binding("ctrl+r", "generate", "Run"),
        Binding("question_mark", "app.help", "Help", show=False),
    ]

    def __init__(self, run: Run, feature: Feature, view: str = "a") -> None:
        super().__init__()
        self.run, self.feature, self.view = run, feature, view
        self.cancel_event = threading.Event()
        self.generating = False
        self.steerer: Any = None  # xdiff_cli.steering.Steerer, created in the worker (imports torch)
        self.last_result: Any = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(self._heading(), id="steer-heading")
        with Horizontal(id="steer-inputs"):
            yield Input(placeholder="type a prompt, Enter to generate", id="prompt")
            yield Label("α", id="scale-label")
            yield ScaleInput(DEFAULT_SCALE, id="scale")
        with Horizontal(id="steer-status-row"):
            yield LoadingIndicator(id="steer-loading")
            yield Static("Enter runs · ↑↓ or +/- change α · Esc stops", id="steer-status")
        with Horizontal(id="steer-panes"):
            yield StreamPane("unsteered", id="pane-baseline")
            yield StreamPane(self._steered_title(DEFAULT_SCALE), id="pane-steered")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.run.id
        self.query_one("#steer-loading").display = False
        self.query_one("#prompt", Input).focus()

    def on_unmount(self) -> None:
        self.cancel_event.set()  # leaving the screen stops a generation still running

    def _heading(self) -> str:
        f = self.feature
        return f"Feature {f.id} · {describe_partition(f)} · s_max {f.max_activation:.2f} · α = 1 is its natural maximum"

    def _steered_title(self, scale: float) -> str:
        return f"steered (feature {self.feature.id} × {format_scale(scale)})"

    @property
    def scale_input(self) -> ScaleInput:
        return self.query_one("#scale", ScaleInput)

    def set_status(self, message: str, *, busy: bool | None = None) -> None:
        self.query_one("#steer-status", Static).update(message)
        if busy is not None:
            self.query_one("#steer-loading").display = busy

    # --- input -----------------------------------------------------------------------
    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_generate()

    @on(Input.Changed, "#scale")
    def _scale_changed(self, event: Input.Changed) -> None:
        scale = self.scale_input.scale
        if scale is not None and not self.generating:
            self.query_one("#pane-steered", StreamPane).border_title = self._steered_title(scale)

    def action_nudge(self, delta: float) -> None:
        self.scale_input.nudge(delta)

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
        self.query_one("#pane-baseline", StreamPane).reset()
        self.query_one("#pane-steered", StreamPane).reset(self._steered_title(scale))
        self.set_status("starting…", busy=True)
        self.generate(prompt, scale)

    def action_cancel_or_back(self) -> None:
        if self.generating:
            self.cancel_event.set()
            self.set_status("stopping…")
        else:
            self.dismiss()

    # --- the worker ---------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="steer")
    def generate(self, prompt: str, scale: float) -> None:
        call = self.app.call_from_thread
        try:
            if self.steerer is None:
                call(self.set_status, "loading the crosscoder…")
                from xdiff_cli.steering import Steerer

                self.steerer = Steerer(self.run, trust_remote_code=getattr(self.app, "trust_remote_code", False))
            features = [(self.feature.id, scale)]
            sides = self.steerer.sides_for(features)
            side = self.view if self.view in sides else sides[0]

            def progress(message: str) -> None:
                call(self.set_status, message)

            self.steerer.load(side, on_progress=progress)
            call(self.set_status, f"generating on model {side.upper()} ({self.steerer.model_name(side)})…")
            result = self.steerer.generate(
                prompt, features, side=side, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0,
                on_token=lambda stream, piece: call(self._append, stream, piece),
                should_stop=self.cancel_event.is_set, measure=True,
            )
        except XdiffError as exc:
            call(self._finished, None, f"error: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - a failed generation must not take the UI down
            call(self._finished, None, f"error: {type(exc).__name__}: {exc}")
            return
        call(self._finished, result, None)

    def _append(self, stream: str, piece: str) -> None:
        pane_id = "#pane-baseline" if stream == "baseline" else "#pane-steered"
        self.query_one(pane_id, StreamPane).append(piece)

    def _finished(self, result: Any, error: str | None) -> None:
        self.generating = False
        self.last_result = result
        if error is not None:
            self.set_status(error, busy=False)
            return
        # The final texts are authoritative (streamed pieces hold back partial characters).
        self.query_one("#pane-baseline", StreamPane).set_text(result.baseline)
        self.query_one("#pane-steered", StreamPane).set_text(result.steered)
        parts = ["stopped" if result.stopped else "done", f"model {result.model.upper()}"]
        if result.layer is not None:
            parts.append(f"layer {result.layer}")
        if result.kl is not None:
            parts.append(f"KL {result.kl:.3f} nats/token")
        parts += result.notes
        self.set_status(" · ".join(parts), busy=False)
