"""Start-up time: `xdiff --help` against a bare `python -c pass`, plus an import-time profile.

Each command runs N times as a fresh subprocess (what a user's shell does); the median wall
time and the median CPU time (user + system of the child: what the command costs, and close to
its wall time on an idle machine; it holds steady on a busy one) are reported, with ratios to
the bare interpreter measured in the same process. The "before" row imports what typer's rich
help loaded (rich.markdown, pygments), which `xdiff --help` used to pay. The
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
    "before: + rich help imports": [sys.executable, "-c", "import xdiff_cli.cli, typer.rich_utils"],
}


def median_seconds(argv: list[str], runs: int) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds of the child) over `runs` fresh processes."""
    import resource

    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


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

    base_wall = base_cpu = None
    print(f"{'command':<30} {'wall s':>7} {'cpu s':>7} {'cpu vs python':>14}")
    for name, argv in COMMANDS.items():
        wall, cpu = median_seconds(argv, args.runs)
        base_wall, base_cpu = base_wall or wall, base_cpu or cpu
        print(f"{name:<30} {wall:7.3f} {cpu:7.3f} {cpu / base_cpu:13.2f}x")
        if name == "xdiff --help":
            help_wall, help_cpu = wall, cpu
    verdict = "meets" if help_cpu < HELP_GOAL_S else "MISSES"
    print(f"\n`xdiff --help` costs {help_cpu:.3f} s of CPU ({help_wall:.3f} s wall on this machine now): "
          f"{verdict} the {HELP_GOAL_S} s goal")
    print(f"\nimport-time profile of `xdiff --help` (top {args.top}, cumulative):")
    for micros, name in import_profile(args.top):
        print(f"  {micros / 1000:8.1f} ms  {name}")


if __name__ == "__main__":
    main()
