"""`xdiff steer`: one steered generation beside the unsteered one (DESIGN §2, §4).

JSON shape (`--json`): one object per steered model,
    {"feature", "model", "scale", "prompt", "baseline", "steered"[, "kl", "kl_random"]}
printed alone when one model is steered, as a list when a shared feature steers both.
With several `--feature`s, "feature" and "scale" are parallel lists.
"""

from __future__ import annotations

import typer

from xdiff_cli.commands.common import RUN_HELP
from xdiff_cli.run.settings import TRUST_REMOTE_CODE_HELP

FEATURE_HELP = "Feature id to steer, optionally with its own scale as ID:SCALE (repeatable)."


def parse_features(specs: list[str], scale: float | None) -> list[tuple[int, float]]:
    """'12' (uses --scale) or '12:-4' (own scale) → [(12, -4.0), ...]."""
    from xdiff_cli.errors import XdiffError

    features = []
    for spec in specs:
        id_text, sep, scale_text = spec.partition(":")
        try:
            feature = int(id_text)
            value = float(scale_text) if sep else scale
        except ValueError:
            raise XdiffError(f"--feature expects ID or ID:SCALE, got {spec!r}", "e.g. --feature 12 or --feature 12:-4") from None
        if value is None:
            raise XdiffError(f"no scale for feature {feature}", f"add --scale S or write --feature {feature}:S")
        if value != value or value in (float("inf"), float("-inf")):
            raise XdiffError(f"the scale of feature {feature} must be a finite number, got {value}", "e.g. --scale 4 or --scale -2")
        if feature < 0:
            raise XdiffError(f"feature {feature} is out of range", "feature ids are non-negative")
        features.append((feature, value))
    return features


def check_features_fire(index, features: list[tuple[int, float]]) -> None:  # noqa: ANN001 - FeatureIndex
    """Refuse, before any model loads, to steer a feature that never fired: its s_max is 0,
    so every α adds a zero vector and the two answers would be identical."""
    from xdiff_cli.errors import XdiffError

    for feature_id, _ in features:
        if feature_id >= index.n_features:
            continue  # out of range: the steerer says so, with the valid ids
        feature = index.feature(feature_id)
        if not feature.alive or feature.max_activation <= 0:
            block = {"a": "a", "b": "b"}.get(feature.partition, "shared")
            raise XdiffError(
                f"feature {feature_id} never fired on the analysed tokens (s_max = 0): steering it changes nothing",
                f"pick a live one from `xdiff features --partition {block}`",
            )


def _steered_label(features: list[tuple[int, float]]) -> str:
    return ", ".join(f"#{f} × {s:+g}" for f, s in features)


def _columns(baseline: str, steered: str, features: list[tuple[int, float]], title: str):
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, expand=True, show_lines=False)
    table.add_column("unsteered", ratio=1, overflow="fold")
    table.add_column(f"steered ({_steered_label(features)})", ratio=1, overflow="fold", style="cyan")
    # Text objects, not markup: model output may contain [brackets].
    from xdiff_cli.safe_text import inert

    table.add_row(Text(inert(baseline.strip())), Text(inert(steered.strip())))
    return table


def steer(
    prompt: str = typer.Argument(..., help="The user message (chat template applied unless --raw)."),
    feature: list[str] = typer.Option(..., "--feature", "-f", help=FEATURE_HELP),
    scale: float | None = typer.Option(None, "--scale", "-s", help="α: multiples of the feature's max activation."),
    run_id: str | None = typer.Option(None, "--run", help=RUN_HELP),
    model: str | None = typer.Option(None, "--model", "-m", help="a or b (default: the model(s) the feature belongs to)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens to generate per answer."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy (the paper's setting)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (same for both answers)."),
    raw: bool = typer.Option(False, "--raw", help="Feed the prompt as raw text, without the chat template."),
    measure: bool = typer.Option(False, "--measure", help="Report mean KL(steered ‖ unsteered) per answer token, beside a random direction of the same norm."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only (no streaming)."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N (default: the run's)."),
    quant: str | None = typer.Option(None, "--quant", help="none, 8bit or 4bit (default: the run's)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
) -> None:
    """Steer features and show the unsteered and steered answers side by side."""
    from xdiff_cli.commands.common import pick_run
    from xdiff_cli.console import console, err_console
    from xdiff_cli.findings.steering import Steerer

    features = parse_features(feature, scale)
    steerer = Steerer(pick_run(run_id, needs="analyze"), device=device, quant=quant,
                      trust_remote_code=trust_remote_code)
    check_features_fire(steerer.index, features)
    sides = steerer.sides_for(features, model)

    def progress(message: str) -> None:
        err_console.print(f"[dim]{message}[/]")

    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, raw=raw, measure=measure)
    results = []
    try:
        for side in sides:
            steerer.load(side, on_progress=progress)
            if as_json:
                results.append(steerer.generate(prompt, features, side=side, **options))
            else:
                results.append(_stream_side(steerer, prompt, features, side, options, console))
    finally:
        steerer.close()
    for result in results:
        for note in result.notes:
            err_console.print(f"[yellow]note:[/] {note}")
    if as_json:
        payload = [r.to_json() for r in results]
        from xdiff_cli.safe_text import json_dumps

        typer.echo(json_dumps(payload[0] if len(payload) == 1 else payload, indent=2))


def _stream_side(steerer, prompt, features, side, options, console):  # noqa: ANN001, ANN202
    """Generate on one model, streaming both columns live on a terminal (printed once when
    piped); print the KL line after."""
    from rich.live import Live
    from rich.markup import escape

    from xdiff_cli.safe_text import inert

    name = escape(inert(steerer.model_name(side), one_line=True))  # run.json text: inert, no markup
    title = f"model {side.upper()} · {name} · layer {steerer.layer(side)}"
    if not console.is_terminal:
        result = steerer.generate(prompt, features, side=side, **options)
        console.print(_columns(result.baseline, result.steered, features, title))
    else:
        texts = {"baseline": "", "steered": ""}
        with Live(_columns("", "", features, title), console=console, refresh_per_second=12) as live:

            def on_token(stream: str, piece: str) -> None:
                texts[stream] += piece
                live.update(_columns(texts["baseline"], texts["steered"], features, title))

            result = steerer.generate(prompt, features, side=side, on_token=on_token, **options)
            live.update(_columns(result.baseline, result.steered, features, title))
    if result.kl is not None:
        console.print(f"KL(steered ‖ unsteered) = {result.kl:.4f} nats per token, over the steered answer")
        if result.kl_random is not None:
            ratio = f"{result.kl / result.kl_random:.1f}x" if result.kl_random > 0 else "n/a"
            console.print(
                f"  random direction, same norm: {result.kl_random:.4f} nats per token ({ratio} that); "
                "0 = no change, ~1 = most next-token probability moved"
            )
    return result


def register(app: typer.Typer) -> None:
    app.command("steer")(steer)
