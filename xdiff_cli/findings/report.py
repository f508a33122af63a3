"""`xdiff report`: one self-contained file an auditor can attach to a model-migration decision.

HTML (inline CSS, an inline SVG histogram, no scripts, no external assets) or Markdown.
Both carry the same sections: the two models, data and training settings, reconstruction
metrics, a histogram of relative decoder norms, and the top exclusive features of each model
with highlighted examples. Every piece of text from models, corpora or settings is escaped.
"""

from __future__ import annotations

import datetime as _dt
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xdiff_cli.findings.feature_columns import format_frequency, why
from xdiff_cli.findings.feature_index import Example, Feature, FeatureIndex, shade_level

SETTINGS_SHOWN = (
    "corpus", "tokens", "layer_a", "layer_b", "context_length", "eval_fraction", "arch", "dict_size", "k",
    "exclusive_frac", "steps", "batch_size", "lr", "quant", "seed", "top_examples",
)
N_HIST_BINS = 20
EXAMPLES_PER_FEATURE = 5
from xdiff_cli.findings.ranking import EXCLUSIVE_R_LOW as EXCLUSIVE_R  # noqa: E402 - R < it (B) or > 1 - it (A)


@dataclass
class ReportData:
    """Everything a report shows, gathered once from the run and its FeatureIndex."""

    run_id: str
    created: str
    models: dict[str, Any]
    settings: dict[str, Any]
    metrics: dict[str, Any]
    summary: dict[str, Any]
    rel_norm_hist: dict[str, list[int]]  # partition -> counts over N_HIST_BINS bins of [0, 1]
    top: dict[str, list[Feature]]  # "a"/"b" -> features (with examples) most worth a look
    blocks: dict[str, dict[str, int]] | None = None  # FeatureIndex.block_counts(): live/total per block
    n_candidates: dict[str, int] | None = None  # "a"/"b" -> live candidate differences on that side


def side_of(feature: Feature) -> str | None:
    """Which model a candidate difference belongs to (None for balanced shared features)."""
    if feature.partition in ("a", "b"):
        return feature.partition
    if feature.rel_norm > 1 - EXCLUSIVE_R:
        return "a"
    if feature.rel_norm < EXCLUSIVE_R:
        return "b"
    return None


def gather(run, top: int = 10) -> ReportData:  # noqa: ANN001 - runs.Run
    index = FeatureIndex.open(run.analysis_path)
    try:
        meta = index.meta
        hist = {p: [0] * N_HIST_BINS for p in ("a", "b", "shared")}
        best: dict[str, list[Feature]] = {"a": [], "b": []}
        n_candidates = {"a": 0, "b": 0}
        for feature in index.features(alive_only=True):  # rank order
            hist[feature.partition][min(N_HIST_BINS - 1, int(feature.rel_norm * N_HIST_BINS))] += 1
            side = side_of(feature) if feature.candidate else None
            if feature.found_in_shared:  # verify found a difference in the shared block
                side = feature.probe_side
            if side and not feature.token_artifact:
                n_candidates[side] += 1
            if side and len(best[side]) < top:
                feature.examples = index.examples(feature.id, view=side, limit=EXAMPLES_PER_FEATURE)
                best[side].append(feature)
        return ReportData(
            run_id=run.id,
            created=run.record.created,
            models={side: m.to_json() for side, m in run.models.items()} or meta.get("models", {}),
            settings={k: getattr(run.settings, k, None) for k in SETTINGS_SHOWN},
            metrics={**meta.get("train_metrics", {}), **run.metrics},
            summary={**meta.get("summary", {}), **_verify_summary(meta.get("verify"))},
            rel_norm_hist=hist,
            top=best,
            blocks=index.block_counts(),
            n_candidates=n_candidates,
        )
    finally:
        index.close()


def default_report_path(run, fmt: str) -> Path:  # noqa: ANN001 - runs.Run
    """A report is a document to share: it goes to the current directory, named after the run."""
    return Path.cwd() / f"xdiff-report-{run.id}.{fmt}"


def _verify_summary(verify: dict[str, Any] | None) -> dict[str, Any]:
    """`xdiff verify`'s verdict counts per block (and the null run's false positives), if verified."""
    if not verify:
        return {}
    out: dict[str, Any] = {}
    for part, name in (("a", "A-exclusive"), ("b", "B-exclusive"), ("shared", "shared")):
        counts = verify.get("counts", {}).get(part, {})
        out[f"verdicts {name}"] = {k: v for k, v in counts.items() if k != "none"}
    out["differences found in the shared block"] = verify.get("found_in_shared", 0)
    fp = verify.get("false_positives")
    if fp:
        out["null run (A vs A): live exclusive-block features / verified exclusive"] = (
            f"{fp['live_exclusive_block']} / {fp['verified_exclusive']}"
        )
    return out


def write_report(run, out: Path | None = None, fmt: str = "html", top: int = 10) -> Path:  # noqa: ANN001
    import os

    from xdiff_cli.atomic import write_text
    from xdiff_cli.safe_text import inert

    data = gather(run, top=top)
    path = Path(out) if out else default_report_path(run, fmt)
    # The templates hold no control characters: any in the document came from the corpus/models.
    write_text(path, inert(render_html(data) if fmt == "html" else render_markdown(data)))
    # The atomic temporary file is private (0600); a report is readable like any document.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return path


# --- shared formatting --------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "—"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return str(value)


def _model_rows(models: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for side in ("a", "b"):
        info = models.get(side)
        if isinstance(info, dict):
            name = info.get("spec") or info.get("repo_id") or info.get("path") or "?"
            rest = {k: v for k, v in info.items() if k not in ("spec",)}
            rows.append((f"Model {side.upper()}", f"{name} ({_fmt(rest)})" if rest else str(name)))
        elif info:
            rows.append((f"Model {side.upper()}", str(info)))
    return rows


# (metric key, what a reader sees, format): the first key present wins for each line, so the
# held-out ("eval_") value replaces the training one and nothing is listed twice.
METRIC_LINES = (
    (("eval_fve_a", "fve_a"), "variance explained in model A (held-out)", "pct"),
    (("eval_fve_b", "fve_b"), "variance explained in model B (held-out)", "pct"),
    (("eval_l0", "mean_l0", "l0"), "active features per token (L0)", "num"),
    (("eval_dead_fraction", "dead_fraction"), "dead features (never fire)", "pct"),
    (("n_tokens",), "held-out token pairs analysed", "int"),
    (("harvested_tokens",), "token pairs harvested", "int"),
    (("aligned_fraction",), "tokens aligned between the two tokenizers", "pct"),
    (("n_candidates",), "candidate differences", "int"),
    (("n_token_artifacts",), "tokenization artifacts", "int"),
)


def _format_metric(value: Any, kind: str) -> str:
    if not isinstance(value, (int, float)):
        return _fmt(value)
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "int":
        return f"{int(value):,}"
    return f"{value:.4g}"


def _metric_rows(data: ReportData) -> list[tuple[str, str]]:
    merged = {**data.metrics, **data.summary}
    rows = []
    for keys, label, kind in METRIC_LINES:
        key = next((k for k in keys if merged.get(k) is not None), None)
        if key is not None:
            rows.append((label, _format_metric(merged[key], kind)))
    if data.blocks:
        for partition, name in (("a", "A-exclusive"), ("b", "B-exclusive"), ("shared", "shared")):
            counts = data.blocks.get(partition, {})
            if counts.get("total"):
                rows.append((f"live {name} features", f"{counts['live']:,} of {counts['total']:,}"))
    rows += [(k, _fmt(v)) for k, v in data.summary.items() if k.startswith(("verdicts ", "differences ", "null run"))]
    return rows


def executive_summary(data: ReportData) -> list[str]:
    """Three or four plain sentences: the models, what was found, and how far to trust it."""
    name_a, name_b = _model_name(data.models, "a"), _model_name(data.models, "b")
    merged = {**data.metrics, **data.summary}
    blocks = data.blocks or {}
    lines = [f"Model A is {name_a}; model B is {name_b}."]
    found = []
    for side, name in (("a", name_a), ("b", name_b)):
        live = blocks.get(side, {}).get("live", 0)
        total = blocks.get(side, {}).get("total", 0)
        candidates = (data.n_candidates or {}).get(side, 0)
        top = data.top.get(side) or []
        words = ", ".join(repr(f.top_token.strip()) for f in top[:3] if f.top_token)
        found.append(
            f"{candidates} candidate difference(s) specific to {side.upper()} ({name}): {live} of {total} "
            f"{side.upper()}-exclusive features fire" + (f"; the top ones fire on {words}" if words else "")
        )
    lines.append("Found: " + "; ".join(found) + ".")
    fve = [merged.get(k) for k in ("eval_fve_a", "eval_fve_b")]
    dead = merged.get("eval_dead_fraction", merged.get("dead_fraction"))
    sure = []
    if all(isinstance(v, (int, float)) for v in fve):
        sure.append(f"the crosscoder explains {100 * fve[0]:.0f}% (A) and {100 * fve[1]:.0f}% (B) of the "
                    "held-out activation variance")
    if isinstance(dead, (int, float)):
        sure.append(f"{100 * dead:.0f}% of its features are dead")
    if isinstance(merged.get("n_tokens"), (int, float)):
        sure.append(f"statistics come from {int(merged['n_tokens']):,} held-out token pairs")
    trust = ("How sure: " + "; ".join(sure) + ". ") if sure else "How sure: "
    lines.append(trust + "These are screening results: a feature is a candidate until steering it "
                 "(`xdiff steer --feature ID --measure`) changes the model's behaviour as its examples suggest.")
    return lines


def _feature_caption(feature: Feature) -> str:
    block = {"a": "A-exclusive", "b": "B-exclusive", "shared": "shared"}[feature.partition]
    return (
        f"feature {feature.id} · {block} · rank {feature.rank} · R {feature.rel_norm:.2f} · "
        f"freq {format_frequency(feature.frequency)} · s_max {feature.max_activation:.3g} · "
        f"score {feature.score:.2f} · {why(feature)}"
        + (f" · verdict {feature.verdict}: {feature.verdict_reason}" if feature.verdict else "")
    )


# --- HTML ---------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;max-width:980px;margin:2em auto;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
.feature{border:1px solid #ddd;border-radius:6px;padding:.6em 1em;margin:1em 0}
.caption{font-weight:600}.label{color:#a15c00;font-weight:600}
.ex{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;white-space:pre-wrap;margin:.35em 0;
 padding:.3em .5em;background:#fafafa;border-left:3px solid #ccc}
.tok{border-radius:2px}.fire{outline:2px solid #d35400}.act{color:#888;font-size:11px}
.muted{color:#777}
"""


def _highlight_html(example: Example, s_max: float) -> str:
    """Example text with every aligned token shaded by its activation; the firing token outlined."""
    out, cursor = [], 0
    for start, end, act in example.token_spans():
        if start < cursor:
            continue
        out.append(html.escape(example.text[cursor:start]))
        alpha = shade_level(act, s_max)  # the TUI's ramp: any firing token gets a visible tint
        classes = "tok fire" if (start, end) == (example.start, example.end) else "tok"
        style = f' style="background:rgba(255,140,0,{alpha:.2f})"' if alpha > 0 else ""
        title = f' title="{act:.3g}"' if act > 0 else ""
        out.append(f'<span class="{classes}"{style}{title}>{html.escape(example.text[start:end])}</span>')
        cursor = end
    out.append(html.escape(example.text[cursor:]))
    return "".join(out)


def _histogram_svg(hist: dict[str, list[int]]) -> str:
    """Stacked bars of relative decoder norm R per block; dashed lines at R = 0.2 and 0.8."""
    width, height, pad = 640, 220, 30
    colours = {"b": "#8e44ad", "shared": "#95a5a6", "a": "#16a085"}
    totals = [sum(hist[p][i] for p in hist) for i in range(N_HIST_BINS)]
    peak = max(totals) or 1
    bar_w = (width - 2 * pad) / N_HIST_BINS
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 40}" '
             f'role="img" aria-label="histogram of relative decoder norms">']
    for i in range(N_HIST_BINS):
        y = height
        for partition in ("shared", "a", "b"):
            count = hist[partition][i]
            if not count:
                continue
            h = (height - pad) * count / peak
            y -= h
            parts.append(
                f'<rect x="{pad + i * bar_w + 1:.1f}" y="{y:.1f}" width="{bar_w - 2:.1f}" height="{h:.1f}" '
                f'fill="{colours[partition]}"><title>{partition}: {count} features, R in '
                f'[{i / N_HIST_BINS:.2f}, {(i + 1) / N_HIST_BINS:.2f})</title></rect>'
            )
    for r in (0.2, 0.8):
        x = pad + r * (width - 2 * pad)
        parts.append(f'<line x1="{x:.1f}" y1="{pad / 2}" x2="{x:.1f}" y2="{height}" stroke="#c0392b" '
                     f'stroke-dasharray="4 3"/>')
    parts.append(f'<line x1="{pad}" y1="{height}" x2="{width - pad}" y2="{height}" stroke="#444"/>')
    for r in (0.0, 0.2, 0.5, 0.8, 1.0):
        x = pad + r * (width - 2 * pad)
        parts.append(f'<text x="{x:.1f}" y="{height + 15}" font-size="11" text-anchor="middle">{r:g}</text>')
    parts.append(f'<text x="{width / 2}" y="{height + 32}" font-size="12" text-anchor="middle">'
                 f'R = |d_A| / (|d_A| + |d_B|)  (0 = B only, 1 = A only) — max bin {peak}</text>')
    legend_x = width - pad - 230
    for i, (partition, name) in enumerate((("a", "A-exclusive"), ("b", "B-exclusive"), ("shared", "shared"))):
        parts.append(f'<rect x="{legend_x + i * 80}" y="4" width="10" height="10" fill="{colours[partition]}"/>'
                     f'<text x="{legend_x + i * 80 + 14}" y="13" font-size="11">{name}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table_html(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>" if rows else '<p class="muted">not recorded</p>'


def _features_html(features: list[Feature], side: str) -> str:
    if not features:
        return f'<p class="muted">No candidate features specific to model {side.upper()}.</p>'
    blocks = []
    for feature in features:
        label = f' <span class="label">{html.escape(feature.label)}</span>' if feature.label else ""
        if feature.label_score is not None:
            label += f' <span class="muted">(detection AUC {feature.label_score:.2f})</span>'
        examples = "".join(
            f'<div class="ex">{_highlight_html(e, feature.max_activation)} '
            f'<span class="act">({e.activation:.3g})</span></div>'
            for e in feature.examples
        )
        blocks.append(f'<div class="feature"><div class="caption">{html.escape(_feature_caption(feature))}'
                      f"{label}</div>{examples}</div>")
    return "".join(blocks)


def render_html(data: ReportData) -> str:
    name_a = _model_name(data.models, "a")
    name_b = _model_name(data.models, "b")
    settings = [(k, _fmt(v)) for k, v in data.settings.items() if v is not None]
    generated = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return "".join([
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>xdiff report — {html.escape(data.run_id)}</title><style>{_CSS}</style></head><body>",
        f"<h1>xdiff report: {html.escape(name_a)} vs {html.escape(name_b)}</h1>",
        f'<p class="muted">run {html.escape(data.run_id)} · created {html.escape(data.created)} · '
        f"generated {generated}</p>",
        "<h2>Summary</h2>", "".join(f"<p>{html.escape(line)}</p>" for line in executive_summary(data)),
        "<h2>Models</h2>", _table_html(_model_rows(data.models)),
        "<h2>Data and training settings</h2>", _table_html(settings),
        "<h2>Reconstruction and dictionary metrics</h2>", _table_html(_metric_rows(data)),
        "<h2>Relative decoder norms</h2>",
        "<p>Features near R = 1 write only to model A, near 0 only to model B. Shared features outside "
        "[0.2, 0.8] are reported as candidate differences alongside the exclusive blocks.</p>",
        _histogram_svg(data.rel_norm_hist),
        f"<h2>Top features specific to model A ({html.escape(name_a)})</h2>",
        _features_html(data.top["a"], "a"),
        f"<h2>Top features specific to model B ({html.escape(name_b)})</h2>",
        _features_html(data.top["b"], "b"),
        '<p class="muted">Token shading: activation of the feature at each aligned token (darker = stronger, '
        "relative to the feature's s_max); outlined: the token the example was chosen for. Candidates are ranked "
        "by breadth, consistency and frequency; tokenization artifacts are labelled and ranked last.</p>",
        "</body></html>\n",
    ])


def _model_name(models: dict[str, Any], side: str) -> str:
    info = models.get(side)
    if isinstance(info, dict):
        return str(info.get("spec") or info.get("repo_id") or info.get("path") or f"model {side.upper()}")
    return str(info) if info else f"model {side.upper()}"


# --- Markdown -----------------------------------------------------------------------------


def _md_escape(text: str) -> str:
    out = text.replace("\\", "\\\\").replace("\n", " ").replace("\r", " ")
    for ch in "|*_`[]<>#":
        out = out.replace(ch, "\\" + ch)
    return out


def _table_md(rows: list[tuple[str, str]]) -> str:
    if not rows:
        return "_not recorded_\n"
    lines = ["| | |", "|---|---|"] + [f"| {_md_escape(k)} | {_md_escape(v)} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def _histogram_md(hist: dict[str, list[int]]) -> str:
    totals = [sum(hist[p][i] for p in hist) for i in range(N_HIST_BINS)]
    peak = max(totals) or 1
    lines = ["```", "R range       A   B  shared"]
    for i in range(N_HIST_BINS):
        bar = "█" * round(30 * totals[i] / peak)
        lines.append(f"{i / N_HIST_BINS:.2f}-{(i + 1) / N_HIST_BINS:.2f} {hist['a'][i]:4d}{hist['b'][i]:4d}"
                     f"{hist['shared'][i]:7d} {bar}")
    lines.append("```")
    return "\n".join(lines) + "\n"


def _features_md(features: list[Feature], side: str) -> str:
    if not features:
        return f"_No candidate features specific to model {side.upper()}._\n"
    out = []
    for feature in features:
        label = f" — **{_md_escape(feature.label)}**" if feature.label else ""
        if feature.label_score is not None:
            label += f" (detection AUC {feature.label_score:.2f})"
        out.append(f"#### {_md_escape(_feature_caption(feature))}{label}\n")
        for e in feature.examples:
            out.append(f"- {_marked_md(e)} ({e.activation:.3g})")
        out.append("")
    return "\n".join(out) + "\n"


def _marked_md(example: Example) -> str:
    """The example's context with every token the feature fires on in «», the firing token
    also bold (Markdown has no shading; the HTML report shades)."""
    out, cursor = [], 0
    for start, end, act in example.token_spans():
        firing = (start, end) == (example.start, example.end)
        if start < cursor or (act <= 0 and not firing):
            continue
        token = "«" + _md_escape(example.text[start:end]) + "»"
        out.append(_md_escape(example.text[cursor:start]))
        out.append(f"**{token}**" if firing else token)
        cursor = end
    out.append(_md_escape(example.text[cursor:]))
    return "".join(out)


def render_markdown(data: ReportData) -> str:
    name_a, name_b = _model_name(data.models, "a"), _model_name(data.models, "b")
    settings = [(k, _fmt(v)) for k, v in data.settings.items() if v is not None]
    return "\n".join([
        f"# xdiff report: {_md_escape(name_a)} vs {_md_escape(name_b)}\n",
        f"run `{data.run_id}` · created {data.created}\n",
        "## Summary\n", "\n\n".join(_md_escape(line) for line in executive_summary(data)) + "\n",
        "## Models\n", _table_md(_model_rows(data.models)),
        "## Data and training settings\n", _table_md(settings),
        "## Reconstruction and dictionary metrics\n", _table_md(_metric_rows(data)),
        "## Relative decoder norms\n",
        "R = |d_A| / (|d_A| + |d_B|): 1 = writes only to A, 0 = only to B. Shared features outside "
        "[0.2, 0.8] count as candidate differences.\n",
        _histogram_md(data.rel_norm_hist),
        f"## Top features specific to model A ({_md_escape(name_a)})\n", _features_md(data.top["a"], "a"),
        f"## Top features specific to model B ({_md_escape(name_b)})\n", _features_md(data.top["b"], "b"),
        "In each example «token» marks every token the feature fires on; **«token»** is the one the "
        "example was chosen for (the HTML report shades each token by its activation).\n",
    ])
