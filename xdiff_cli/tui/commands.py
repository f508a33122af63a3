"""Command palette entries (ctrl+p): go to a feature by id, switch run, switch partition."""

from __future__ import annotations

from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

from xdiff_cli.run.runs import list_runs


class XdiffCommands(Provider):
    def _features_screen(self):  # noqa: ANN202 - FeaturesScreen, imported lazily
        from xdiff_cli.tui.screens.features import FeaturesScreen

        for screen in reversed(self.app.screen_stack):
            if isinstance(screen, FeaturesScreen):
                return screen
        return None

    def _static_commands(self) -> list[tuple[str, object, str]]:
        commands: list[tuple[str, object, str]] = [
            ("Switch run…", self.app.action_switch_run, "Pick another run"),  # type: ignore[attr-defined]
            ("Help: keys", self.app.action_help, "Show the key bindings"),  # type: ignore[attr-defined]
        ]
        screen = self._features_screen()
        if screen is not None:
            for partition, name in (("a", "A-exclusive"), ("b", "B-exclusive"), ("shared", "Shared"), ("all", "All")):
                commands.append((f"Show {name} features", partial(screen.action_partition, partition), ""))
            commands.append(("Go to feature…", partial(screen.action_focus_search), "Type 'feature N' here to jump"))
        for run in list_runs():
            commands.append((f"Open run {run.id}", partial(self.app.open_run, run), run.current_stage))  # type: ignore[attr-defined]
        return commands

    async def discover(self) -> Hits:
        for name, callback, help_text in self._static_commands():
            yield DiscoveryHit(name, callback, help=help_text or None)  # type: ignore[arg-type]

    async def search(self, query: str) -> Hits:
        screen = self._features_screen()
        number = query.lower().removeprefix("feature").strip().lstrip("#")
        if screen is not None and number.isdigit() and int(number) < screen.index.n_features:
            feature_id = int(number)
            yield Hit(1.0, f"Go to feature {feature_id}", partial(screen.select_feature, feature_id))
        matcher = self.matcher(query)
        for name, callback, help_text in self._static_commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text or None)  # type: ignore[arg-type]
