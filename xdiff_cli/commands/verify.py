"""`xdiff verify`: attach evidence (transfer probe, null control, steer check) to every candidate."""

from __future__ import annotations

import json

import typer

VERIFY_HELP = (
    "Attach evidence to the run's candidate differences and give each a verdict: exclusive (its own "
    "model's residual predicts the feature, the other model's does not), analogous (the other model "
    "predicts it too), dead (never fires on held-out text), weak (too rare, or not predictable even from its "
    "own model, to judge). The evidence is a ridge probe fitted in closed form on the train split and scored "
    "on held-out text (AUC of fires-vs-not, which decides, and R²), cross-fitted over word types: each token "
    "is predicted by a fit that never saw its word, so telling words apart does not pass for carrying the "
    "concept. Every live feature is probed: a shared feature only one model predicts is reported as a "
    "difference found in the shared block. --null also trains the same configuration on model A against "
    "itself (same text, seed + 1): its probe scores set the thresholds and it reports how many "
    "'exclusive' features the method makes with no real difference. Resumes; rerunning is a no-op."
)


def verify(
    run_id: str | None = typer.Option(None, "--run", help="Run id (default: newest analysed)."),
    null: bool = typer.Option(False, "--null", help="Calibrate thresholds on an A-vs-A null run (trains once more)."),
    steer_check: int = typer.Option(
        0, "--steer-check", min=0, help="Steer the top N verified candidates in both models and report the KL."
    ),
    force: bool = typer.Option(False, "--force", help="Recompute even if the run is already verified."),
    as_json: bool = typer.Option(False, "--json", help="Print the verify summary as JSON."),
) -> None:
    from xdiff_cli.commands.common import pick_run
    from xdiff_cli.findings.verify import verify_run

    run = pick_run(run_id, needs="analyze")
    with run.lock():
        run.mark_stage("verify", "running")
        try:
            meta = verify_run(run, progress=not as_json, force=force, null=null, steer_check=steer_check)
        except BaseException:
            run.mark_stage("verify", "failed")
            raise
        run.mark_stage("verify", "done")
    if as_json:
        typer.echo(json.dumps(meta))
        return
    from xdiff_cli.console import console

    for line in summary_lines(run.id, meta):
        console.print(line, highlight=False)


def summary_lines(run_id: str, meta: dict) -> list[str]:
    counts = meta.get("counts", {})
    lines = [f"verified run {run_id}: {meta.get('n_probed', 0)} live features probed "
             f"({meta.get('n_train_tokens', 0):,} train / {meta.get('n_eval_tokens', 0):,} held-out tokens)"]
    names = {"a": "A-exclusive", "b": "B-exclusive", "shared": "shared"}
    for part in ("a", "b", "shared"):
        c = counts.get(part, {})
        lines.append(
            f"  {names[part]:>11}: {c.get('exclusive', 0)} exclusive, {c.get('analogous', 0)} analogous, "
            f"{c.get('weak', 0)} weak, {c.get('dead', 0)} dead"
        )
    if meta.get("found_in_shared"):
        lines.append(f"  {meta['found_in_shared']} differences found in the shared block (only one model predicts them)")
    th = meta.get("thresholds", {})
    lines.append(
        f"  thresholds ({th.get('source', 'defaults')}): exclusive when the other model reaches < "
        f"{th.get('transfer_ratio', 0):.2f} of its own model's held-out AUC above chance, and AUC < "
        f"{th.get('max_other_auc', 0):.2f}"
    )
    fp = meta.get("false_positives")
    if fp:
        lines.append(
            f"  null run (A vs A): {fp['live_exclusive_block']} live exclusive-block features and "
            f"{fp['candidates']} live candidates with no real difference; verify calls "
            f"{fp['verified_exclusive']} of them exclusive (false positives)"
        )
    return lines


verify.__doc__ = VERIFY_HELP


def register(app: typer.Typer) -> None:
    app.command("verify", help=VERIFY_HELP)(verify)
