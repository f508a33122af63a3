"""Peak memory of a harvest whose corpus holds one huge line (issue #18, item 8).

A .txt corpus of short documents with one 19 MB line in the middle is harvested by the tiny
Llama/GPT-OSS pair (context 128). Each configuration runs in its own child process (peak RSS
only grows within a process), so "baseline" and "windowed" are measured side by side:

- baseline: the line read, tokenized and stored whole (the window turned off);
- windowed: what xdiff does — read at most 1M characters of a line, tokenize and store only
  the `context_length × 16`-character window that can be harvested.

Also reported: documents.jsonl size, and the peak RSS of a corpus without the huge line (the
floor: models, tokenizers, torch). Run: `python benchmarks/long_documents.py [--mb 19]`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from xdiff_cli.data import corpus
from xdiff_cli.data import harvest as hv
from xdiff_cli.models.loading import load_model

tiny, corpus_path, out, mode = sys.argv[1:5]
if mode == "baseline":  # the pre-fix behaviour: whole lines, whole documents
    hv.clip_document = lambda doc, max_chars: doc
    corpus._bounded_lines = lambda fh: iter(fh)
a = load_model(Path(tiny) / "llama", device="cpu")
b = load_model(Path(tiny) / "gptoss", device="cpu")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
hv.harvest(a, b, corpus_path, out, tokens=4000, context_length=128, batch_size=8, progress=False)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
docs = (Path(out) / "documents.jsonl").stat().st_size
print(json.dumps({"rss_before_mb": before / 1024, "rss_peak_mb": peak / 1024, "docs_mb": docs / 1e6, "seconds": seconds}))
"""


def write_corpus(path: Path, huge_mb: float) -> None:
    normal = "the blue cat saw a small red box near the river and then the dog ran home\n"
    with path.open("w") as fh:
        fh.write(normal * 30)
        if huge_mb:
            unit = "the tiger ran across the field "
            fh.write(unit * int(huge_mb * 1e6 / len(unit)) + "\n")
        fh.write(normal * 200)


def measure(tiny: Path, corpus_path: Path, out: Path, mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tiny), str(corpus_path), str(out), mode],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=19.0, help="size of the huge line in MB")
    args = parser.parse_args()
    from xdiff_cli.models.tiny import build_tiny_models

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny = tmp / "tiny"
        build_tiny_models(tiny)
        rows = {}
        for name, mb, mode in (("no huge line", 0, "windowed"), ("baseline", args.mb, "baseline"),
                               ("windowed", args.mb, "windowed")):
            corpus_path = tmp / f"corpus-{mb}.txt"
            if not corpus_path.exists():
                write_corpus(corpus_path, mb)
            rows[name] = measure(tiny, corpus_path, tmp / f"store-{name.replace(' ', '-')}", mode)
        print(f"corpus: short documents + one {args.mb:g} MB line; tiny llama vs gpt-oss, context 128, 4,000 pairs")
        print(f"{'':14} {'RSS before':>11} {'peak RSS':>10} {'harvest adds':>13} {'documents.jsonl':>16} {'time':>7}")
        for name, r in rows.items():
            print(f"{name:14} {r['rss_before_mb']:9.0f}MB {r['rss_peak_mb']:8.0f}MB {r['rss_peak_mb'] - r['rss_before_mb']:11.0f}MB"
                  f" {r['docs_mb']:14.2f}MB {r['seconds']:6.1f}s")
        base, fixed = rows["baseline"], rows["windowed"]
        grow = lambda r: max(1.0, r["rss_peak_mb"] - r["rss_before_mb"])  # noqa: E731
        print(f"harvest memory growth, baseline / windowed: {grow(base) / grow(fixed):.1f}x; "
              f"documents.jsonl: {base['docs_mb'] / max(fixed['docs_mb'], 1e-6):.0f}x smaller")


if __name__ == "__main__":
    main()
