"""Start-up time: `xdiff --help` against a bare `python -c pass`, plus an import-time profile.

Each command runs N times as a fresh subprocess (what a user's shell does); the median wall
time is reported, and the ratio to the bare interpreter measured in the same process. The
profile (`python -X importtime`) lists the modules that cost the most, cumulatively, so a
heavy import that sneaks into the `--help` path shows up by name.

    python benchmarks/startup.py            # 7 runs each, top 12 imports
    python benchmarks/startup.py --runs 15 --top 20
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

HELP_GOAL_S = 0.3
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "xdiff --help": [sys.executable, "-m", "xdiff_cli", "--help"],
    "xdiff features --help": [sys.executable, "-m", "xdiff_cli", "features", "--help"],
    "xdiff --version": [sys.executable, "-m", "xdiff_cli", "--version"],
}


def median_seconds(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def import_profile(top: int) -> list[tuple[int, str]]:
    """(cumulative µs, module) of the costliest imports behind `xdiff --help`."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "xdiff_cli", "--help"],
        capture_output=True, text=True, check=True,
    )
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = (part.strip() for part in line.removeprefix("import time:").split("|"))
        rows.append((int(cumulative), name.strip()))
    return sorted(rows, reverse=True)[:top]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()

    base = None
    print(f"{'command':<24} {'median':>8} {'vs python':>10}")
    for name, argv in COMMANDS.items():
        seconds = median_seconds(argv, args.runs)
        base = base or seconds
        print(f"{name:<24} {seconds:8.3f} {seconds / base:9.2f}x")
        if name == "xdiff --help":
            help_s = seconds
    verdict = "meets" if help_s < HELP_GOAL_S else "MISSES"
    print(f"\n`xdiff --help` {help_s:.3f} s: {verdict} the {HELP_GOAL_S} s goal "
          f"({help_s - base:.3f} s above a bare interpreter)")
    print(f"\nimport-time profile of `xdiff --help` (top {args.top}, cumulative):")
    for micros, name in import_profile(args.top):
        print(f"  {micros / 1000:8.1f} ms  {name}")


if __name__ == "__main__":
    main()
