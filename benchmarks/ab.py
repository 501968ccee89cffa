"""Two servers side by side, window by window: what one change is worth.

    python benchmarks/ab.py netserve-hub uvloop-protocol
    python benchmarks/ab.py netserve-hub netserve-hub@/tmp/base --scenario "churn c=16"

A side is a row of servers.py, optionally ``@TREE``: a source tree (a git
worktree of another commit, say) whose ``src/`` is imported instead of the one
installed. Both servers run for the whole comparison, pinned to the same core;
the client measures them in turns (A then B, B then A, ...), with a warm-up
burst before each window, so that a slow minute of a shared machine falls on
both. Prints each pair's ratio of requests/s and of server CPU per request
(B's over A's: above 1 when A is cheaper), and the medians. On the two-core VM
of docs/benchmarks.md single pairs of the same code still ranged about ±15%:
take ten pairs or more before reading a few percent.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

import run  # benchmarks/run.py, beside this file


def side_environment(side: str) -> tuple[str, dict[str, str] | None]:
    """The row of a side, and the environment that imports its tree."""
    row, _, tree = side.partition("@")
    if row not in run.ALL_ROWS:
        raise SystemExit(f"unknown row {row!r}; rows: {', '.join(run.ALL_ROWS)}")
    if not tree:
        return row, None
    source = Path(tree).resolve() / "src"
    if not (source / "netserve" / "__init__.py").is_file():
        raise SystemExit(f"{tree!r} has no src/netserve to import")
    return row, {**os.environ, "PYTHONPATH": str(source)}


@contextlib.contextmanager
def serving(side: str, tools: dict[str, Path], core: int | None) -> Iterator[run.Server]:
    row, env = side_environment(side)
    server = run.Server(row, tools, core, udp=False, env=env)
    try:
        yield server
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="a row of servers.py, optionally ROW@TREE")
    parser.add_argument("b", help="the other side, as A")
    scenarios = {scenario.name: scenario for scenario in run.PINGPONG + run.CHURN}
    parser.add_argument("--scenario", default="pingpong c=256", choices=sorted(scenarios))
    parser.add_argument("--rounds", type=int, default=10, help="pairs of windows (default 10)")
    parser.add_argument("--window", type=float, default=3.0, help="seconds measured per window")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.window <= 0 or args.warmup < 0:
        parser.error("rounds must be at least 1, the window positive, the warm-up not negative")
    scenario = scenarios[args.scenario]
    plan = run.Plan(
        rows=[args.a, args.b],
        scenarios=[scenario],
        rounds=args.rounds,
        warmup_s=args.warmup,
        window_s=args.window,
        idle=False,
        udp=False,
        shutdown=False,
    )
    tools = run.build_tools()
    run.raise_fd_limit()
    server_core, client_core = run.cores()
    rps_ratios, cpu_ratios = [], []
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(serving(side, tools, server_core)) for side in plan.rows]
        for round_ in range(plan.rounds):
            order = (0, 1) if round_ % 2 == 0 else (1, 0)
            figures = {}
            for side in order:
                figures[side] = run.measure(servers[side], tools, client_core, scenario, plan)
            rps = [figures[side]["rps"] for side in (0, 1)]
            cpu = [figures[side]["server_cpu_s"] / figures[side]["requests"] for side in (0, 1)]
            rps_ratios.append(rps[0] / rps[1])
            cpu_ratios.append(cpu[1] / cpu[0] if cpu[0] else float("nan"))
            steal = [
                figures[side]["steal"] for side in (0, 1) if figures[side]["steal"] is not None
            ]
            stolen = f", steal {max(steal):.1%}" if steal else ""
            print(
                f"pair {round_ + 1}: {args.a} {rps[0]:,.0f}/s {cpu[0] * 1e6:.1f} us, "
                f"{args.b} {rps[1]:,.0f}/s {cpu[1] * 1e6:.1f} us; "
                f"ratio {rps_ratios[-1]:.3f}, cpu {cpu_ratios[-1]:.3f}{stolen}",
                flush=True,
            )
    print(
        f"{scenario.name}, {args.a} / {args.b} over {plan.rounds} pairs: "
        f"requests/s {statistics.median(rps_ratios):.3f} "
        f"({min(rps_ratios):.2f}-{max(rps_ratios):.2f}), "
        f"CPU per request {statistics.median(cpu_ratios):.3f} "
        f"({min(cpu_ratios):.2f}-{max(cpu_ratios):.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
