"""netserve's benchmark suite: every server row beside the others, in one run.

    python benchmarks/run.py --quick     # a few rows and scenarios, under 3 minutes
    python benchmarks/run.py --full      # the whole matrix
    python benchmarks/run.py --smoke     # seconds: checks that the suite works

Method (issue 4): the load comes from a compiled epoll client (client.c, built
here with the system compiler) that reports its own CPU next to the server's;
server and client are pinned to different cores; every server is warmed up
before a fixed measurement window; each row runs twice, in alternating order,
and the report gives medians, the spread, p50/p99 latency and ratios to the C
reference and to stdlib ThreadingTCPServer. Everything binds 127.0.0.1 on
ports the OS picks; every process started is stopped; every phase is bounded.

Writes results/<time>.json (every raw figure and the machine), results/latest.md
and results/latest.png (with matplotlib, from the [bench] extra).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"
RESULTS = HERE / "results"
HOST = "127.0.0.1"

ALL_ROWS = [
    "c-epoll",
    "netserve-hub",
    "netserve-pool",
    "netserve-threading",
    "netserve-forking",
    "netserve-sync",
    "stdlib-threading",
    "stdlib-forking",
    "stdlib-sync",
    "asyncio-streams",
    "asyncio-protocol",
    "uvloop-streams",
    "uvloop-protocol",
    "gevent",
]
PEER_MODULES = {"uvloop": "uvloop", "gevent": "gevent"}


@dataclass(frozen=True)
class Scenario:
    name: str
    mode: str  # the client's mode
    conns: int
    line_bytes: int = 64
    sources: int = 1  # churn: source addresses to rotate over


PINGPONG = [
    Scenario("pingpong c=1", "pingpong", 1),
    Scenario("pingpong c=16", "pingpong", 16),
    Scenario("pingpong c=256", "pingpong", 256),
    Scenario("pingpong c=2048", "pingpong", 2048),
    Scenario("pingpong c=16 16KiB", "pingpong", 16, 16384),
]
CHURN = [
    Scenario("churn c=1", "churn", 1, sources=16),
    Scenario("churn c=16", "churn", 16, sources=16),
    Scenario("churn c=128", "churn", 128, sources=16),
]
IDLE = Scenario("idle 5000 + pingpong c=16", "idle", 5000)
UDP = Scenario("udp c=16", "udp", 16)


@dataclass
class Plan:
    rows: list[str]
    scenarios: list[Scenario]
    rounds: int
    warmup_s: float
    window_s: float
    idle: bool
    udp: bool
    shutdown: bool


PLANS = {
    "smoke": Plan(
        ["c-epoll", "netserve-hub", "netserve-pool"],
        [Scenario("pingpong c=16", "pingpong", 16), Scenario("churn c=4", "churn", 4, sources=4)],
        rounds=2,
        warmup_s=0.2,
        window_s=0.3,
        idle=False,
        udp=True,
        shutdown=True,
    ),
    "quick": Plan(
        [
            "c-epoll",
            "netserve-hub",
            "netserve-pool",
            "netserve-threading",
            "stdlib-threading",
            "asyncio-protocol",
            "uvloop-streams",
            "uvloop-protocol",
            "gevent",
        ],
        [Scenario("pingpong c=256", "pingpong", 256), CHURN[1]],
        rounds=2,
        warmup_s=1.0,
        window_s=2.0,
        idle=False,
        udp=False,
        shutdown=False,
    ),
    # The rows and scenarios of issue 3's targets only, in five alternating
    # rounds: on a shared machine the peers of a ratio are measured a minute
    # apart instead of ten, and the median of five shrugs off a noisy window.
    "targets": Plan(
        ["netserve-hub", "uvloop-protocol", "uvloop-streams", "netserve-pool", "stdlib-threading"],
        [PINGPONG[2], PINGPONG[3], CHURN[1]],
        rounds=5,
        warmup_s=1.0,
        window_s=3.0,
        idle=True,
        udp=False,
        shutdown=False,
    ),
    "full": Plan(
        ALL_ROWS,
        PINGPONG + CHURN,
        rounds=2,
        warmup_s=1.0,
        window_s=3.0,
        idle=True,
        udp=True,
        shutdown=True,
    ),
}


# -- building and processes ----------------------------------------------------------


def build_tools() -> dict[str, Path]:
    """Compile the C client and reference server (once per source change)."""
    BUILD.mkdir(exist_ok=True)
    compiler = os.environ.get("CC", "cc")
    tools = {}
    for name, source in (("client", "client.c"), ("echo_server", "echo_server.c")):
        target = BUILD / name
        src = HERE / source
        if not target.exists() or target.stat().st_mtime < src.stat().st_mtime:
            subprocess.run(
                [compiler, "-O2", "-Wall", "-Wextra", "-o", str(target), str(src)],
                check=True,
                timeout=120,
            )
        tools[name] = target
    return tools


def raise_fd_limit() -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cores() -> tuple[int | None, int | None]:
    """(server core, client core): different cores when there are two."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None, None
    return available[0], available[1]


def _pinned(core: int | None) -> Any:
    if core is None:
        return None
    return lambda: os.sched_setaffinity(0, {core})


class Server:
    """A server row in its own process; stopped (and its children) on exit."""

    def __init__(
        self,
        row: str,
        tools: dict[str, Path],
        core: int | None,
        *,
        udp: bool,
        env: dict[str, str] | None = None,
    ) -> None:
        if row == "c-epoll":
            command = [str(tools["echo_server"]), "0"]
        else:
            command = [sys.executable, str(HERE / "servers.py"), row] + (["udp"] if udp else [])
        self.proc = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_pinned(core),
            start_new_session=True,  # its children die with it
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "READY <port>", once it listens
        if not line.startswith("READY "):
            # Its last words first: stop() closes the pipes.
            self.proc.kill()
            errors = self.proc.stderr.read() if self.proc.stderr is not None else ""
            self.stop()
            raise RuntimeError(f"{row} did not start: {line!r} {errors[-2000:]}")
        self.port = int(line.split()[1])
        self.core = core

    def cpu_seconds(self) -> float:
        """User+system CPU of the server process and its reaped children."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            return 0.0
        ticks = os.sysconf("SC_CLK_TCK")
        return sum(int(fields[i]) for i in (11, 12, 13, 14)) / ticks

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # Children of forking rows are in the same session.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.communicate()


@contextlib.contextmanager
def running(row: str, tools: dict[str, Path], core: int | None, *, udp: bool) -> Iterator[Server]:
    server = Server(row, tools, core, udp=udp)
    try:
        yield server
    finally:
        server.stop()


def run_client(
    tools: dict[str, Path], core: int | None, port: int, scenario: Scenario, seconds: float
) -> dict[str, Any]:
    command = [
        str(tools["client"]),
        scenario.mode,
        HOST,
        str(port),
        str(scenario.conns),
        str(seconds),
        str(scenario.line_bytes),
        str(scenario.sources),
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        preexec_fn=_pinned(core),
        check=True,
    )
    figures: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


# -- measuring -------------------------------------------------------------------------


def core_times() -> dict[int, tuple[int, int]]:
    """Per core: (ticks stolen by the hypervisor, all ticks), from /proc/stat."""
    times = {}
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            ticks = [int(field) for field in fields]
            # user nice system idle iowait irq softirq steal ...
            times[int(name[3:])] = (ticks[7] if len(ticks) > 7 else 0, sum(ticks[:8]))
    return times


def steal_share(before: dict[int, tuple[int, int]], cores: list[int | None]) -> float | None:
    """The larger share of time the hypervisor took from these cores since ``before``.

    On a shared host a window where it took much (the client's or the server's
    core stalled) measures the host, not the server.
    """
    after = core_times()
    shares = []
    for core in cores:
        if core is None or core not in before or core not in after:
            continue
        stolen = after[core][0] - before[core][0]
        total = after[core][1] - before[core][1]
        if total > 0:
            shares.append(stolen / total)
    return round(max(shares), 3) if shares else None


def measure(
    server: Server, tools: dict[str, Path], client_core: int | None, scenario: Scenario, plan: Plan
) -> dict[str, Any]:
    # Warm-up: a fresh asyncio server is 2 to 4 times slower until glibc's
    # malloc thresholds adapt (measured here while building this harness).
    run_client(tools, client_core, server.port, scenario, plan.warmup_s)
    cpu_before = server.cpu_seconds()
    times_before = core_times()
    figures = run_client(tools, client_core, server.port, scenario, plan.window_s)
    figures["server_cpu_s"] = round(server.cpu_seconds() - cpu_before, 3)
    figures["steal"] = steal_share(times_before, [server.core, client_core])
    return figures


def measure_idle(
    server: Server, tools: dict[str, Path], client_core: int | None, plan: Plan
) -> dict[str, Any]:
    busy = Scenario("pingpong c=16", "pingpong", 16)
    run_client(tools, client_core, server.port, busy, plan.warmup_s)
    rss_before = server.rss_bytes()
    holder = subprocess.Popen(
        [str(tools["client"]), "idle", HOST, str(server.port), str(IDLE.conns), "120"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=_pinned(client_core),
    )
    try:
        assert holder.stdout is not None
        held = int(holder.stdout.readline().split()[1])  # "held N": all connected
        # Let the server accept the backlog before reading its memory: run the
        # busy load once (it is served only after the idle ones are accepted by
        # servers that accept in order).
        run_client(tools, client_core, server.port, busy, plan.warmup_s)
        rss_after = server.rss_bytes()
        cpu_before = server.cpu_seconds()
        times_before = core_times()
        figures = run_client(tools, client_core, server.port, busy, plan.window_s)
        figures["server_cpu_s"] = round(server.cpu_seconds() - cpu_before, 3)
        figures["steal"] = steal_share(times_before, [server.core, client_core])
    finally:
        assert holder.stdin is not None
        holder.stdin.close()  # the holder drains and exits
        try:
            holder.wait(timeout=60)
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait()
            assert holder.stdout is not None
            holder.stdout.close()
    figures["idle_held"] = held
    figures["rss_before"] = rss_before
    figures["rss_after"] = rss_after
    figures["bytes_per_idle_conn"] = (
        max(0, round((rss_after - rss_before) / held)) if held else None
    )
    return figures


def measure_shutdown() -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, str(HERE / "shutdown_latency.py")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    latencies: dict[str, Any] = json.loads(result.stdout)
    return latencies


def available_rows(rows: list[str]) -> tuple[list[str], list[str]]:
    """Rows whose peer library is installed, and those skipped for lack of it."""
    usable, missing = [], []
    for row in rows:
        module = PEER_MODULES.get(row.split("-")[0])
        if module is None:
            usable.append(row)
            continue
        try:
            __import__(module)
        except ImportError:
            missing.append(row)
        else:
            usable.append(row)
    return usable, missing


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


@dataclass
class Results:
    plan_name: str
    started: str
    machine: dict[str, Any]
    # (scenario name, row) -> list of figures, one per round
    runs: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    shutdown: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def add(self, scenario: str, row: str, figures: dict[str, Any]) -> None:
        self.runs.setdefault((scenario, row), []).append(figures)


def run_plan(name: str, plan: Plan, rows_filter: list[str] | None) -> Results:
    tools = build_tools()
    raise_fd_limit()
    server_core, client_core = cores()
    rows, missing = available_rows(rows_filter or plan.rows)
    results = Results(name, datetime.datetime.now().isoformat(timespec="seconds"), machine())
    results.machine["server_core"] = server_core
    results.machine["client_core"] = client_core
    results.skipped = missing
    for round_ in range(plan.rounds):
        order = rows if round_ % 2 == 0 else list(reversed(rows))
        for row in order:
            print(f"round {round_ + 1}/{plan.rounds}: {row}", file=sys.stderr, flush=True)
            with running(row, tools, server_core, udp=False) as server:
                for scenario in plan.scenarios:
                    results.add(
                        scenario.name, row, measure(server, tools, client_core, scenario, plan)
                    )
            # Memory per idle connection is read on a fresh server: one whose
            # heap grew under 2048 connections would absorb the idle ones.
            # (Sync servers serve one connection at a time: no idle capacity.)
            if plan.idle and row not in ("netserve-sync", "stdlib-sync"):
                with running(row, tools, server_core, udp=False) as server:
                    results.add(IDLE.name, row, measure_idle(server, tools, client_core, plan))
            if plan.udp and row != "c-epoll" and "protocol" not in row:
                with running(row, tools, server_core, udp=True) as server:
                    results.add(UDP.name, row, measure(server, tools, client_core, UDP, plan))
    if plan.shutdown:
        results.shutdown = measure_shutdown()
    return results


# -- reporting -------------------------------------------------------------------------


def summarise(results: Results) -> dict[str, dict[str, dict[str, Any]]]:
    """scenario -> row -> medians and spread over the rounds."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for (scenario, row), runs in results.runs.items():
        rps = [r["rps"] for r in runs]
        summary = {
            "rps": statistics.median(rps),
            "rps_min": min(rps),
            "rps_max": max(rps),
            "p50_us": statistics.median(r["p50_us"] for r in runs),
            "p99_us": statistics.median(r["p99_us"] for r in runs),
            "errors": sum(r["errors"] for r in runs),
            "server_cpu": statistics.median(r["server_cpu_s"] / r["seconds"] for r in runs),
            "client_cpu": statistics.median(
                (r["cpu_user_s"] + r["cpu_sys_s"]) / max(r["seconds"], 1e-9) for r in runs
            ),
        }
        per_conn = [
            r["bytes_per_idle_conn"] for r in runs if r.get("bytes_per_idle_conn") is not None
        ]
        if per_conn:
            summary["bytes_per_idle_conn"] = statistics.median(per_conn)
        steal = [r["steal"] for r in runs if r.get("steal") is not None]
        summary["steal"] = max(steal) if steal else None
        table.setdefault(scenario, {})[row] = summary
    return table


def ratio(table: dict[str, dict[str, Any]], row: str, other: str) -> float | None:
    if row in table and other in table and table[other]["rps"]:
        return float(table[row]["rps"] / table[other]["rps"])
    return None


def round_ratios(results: Results, scenario: str, row: str, peer: str) -> str:
    """The ratio within each round, sorted: '0.71 0.78 0.85'."""
    mine = results.runs.get((scenario, row), [])
    theirs = results.runs.get((scenario, peer), [])
    values = sorted(a["rps"] / b["rps"] for a, b in zip(mine, theirs, strict=False) if b["rps"])
    return " ".join(f"{v:.2f}" for v in values)


TARGETS = [
    # (description, scenario, row, peer, target ratio)
    ("hub / uvloop streams, c=256", "pingpong c=256", "netserve-hub", "uvloop-streams", 1.0),
    ("hub / uvloop Protocol, c=256", "pingpong c=256", "netserve-hub", "uvloop-protocol", 0.75),
    ("hub / uvloop streams, c=2048", "pingpong c=2048", "netserve-hub", "uvloop-streams", 1.0),
    ("hub / uvloop Protocol, c=2048", "pingpong c=2048", "netserve-hub", "uvloop-protocol", 0.75),
    ("hub / uvloop streams, churn c=16", "churn c=16", "netserve-hub", "uvloop-streams", 1.0),
    ("hub / uvloop Protocol, churn c=16", "churn c=16", "netserve-hub", "uvloop-protocol", 0.75),
    ("pool / stdlib threading, churn c=16", "churn c=16", "netserve-pool", "stdlib-threading", 2.0),
]


def markdown(results: Results) -> str:
    table = summarise(results)
    m = results.machine
    lines = [
        f"# netserve benchmark: {results.plan_name} run, {results.started}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"{m['implementation']} {m['python']}. Server pinned to core {m['server_core']}, "
        f"client to core {m['client_core']}.",
        "",
        "Requests/s are medians of the rounds (spread: min to max). CPU is the share of "
        "one core used during the window; a client near 100% means the client was the limit. "
        "Steal is the most time the hypervisor took from the server's or the client's core "
        "in any round's window: a few percent means that round measured the host.",
        "",
    ]
    if results.skipped:
        lines += [f"Rows skipped (peer not installed): {', '.join(results.skipped)}.", ""]
    lines += [
        "## Targets (issue 3)",
        "",
        "The ratio of the medians, and the ratio within each round (the two rows "
        "of a round ran minutes apart at most): their spread shows the machine's noise.",
        "",
        "| ratio | measured | each round | target | met |",
        "|---|---|---|---|---|",
    ]
    for description, scenario, row, peer, target in TARGETS:
        value = ratio(table.get(scenario, {}), row, peer)
        if value is not None:
            met = "yes" if value >= target else "no"
            rounds = round_ratios(results, scenario, row, peer)
            lines.append(f"| {description} | {value:.2f}x | {rounds} | {target:.2f}x | {met} |")
    idle = table.get(IDLE.name, {}).get("netserve-hub", {}).get("bytes_per_idle_conn")
    if idle is not None:
        met = "yes" if idle <= 6 * 1024 else "no"
        lines.append(
            f"| hub memory per idle connection | {idle / 1024:.1f} KiB | | <= 6 KiB | {met} |"
        )
    lines.append("")
    for scenario, rows in table.items():
        lines += [
            f"## {scenario}",
            "",
            "| server | req/s | spread | p50 µs | p99 µs | errors | server CPU | client CPU "
            "| steal | / C | / stdlib threading |"
            + (" idle bytes/conn |" if scenario == IDLE.name else ""),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            + ("---:|" if scenario == IDLE.name else ""),
        ]
        for row, s in sorted(rows.items(), key=lambda item: -item[1]["rps"]):
            to_c = ratio(rows, row, "c-epoll")
            to_threading = ratio(rows, row, "stdlib-threading")
            cells = [
                row,
                f"{s['rps']:,.0f}",
                f"{s['rps_min']:,.0f}-{s['rps_max']:,.0f}",
                f"{s['p50_us']:,.0f}",
                f"{s['p99_us']:,.0f}",
                str(s["errors"]),
                f"{100 * s['server_cpu']:.0f}%",
                f"{100 * s['client_cpu']:.0f}%",
                "" if s["steal"] is None else f"{100 * s['steal']:.1f}%",
                "" if to_c is None else f"{to_c:.2f}",
                "" if to_threading is None else f"{to_threading:.2f}",
            ]
            if scenario == IDLE.name:
                per = s.get("bytes_per_idle_conn")
                cells.append("" if per is None else f"{per:,.0f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if results.shutdown:
        lines += [
            "## shutdown() latency",
            "",
            "Time from `shutdown()` to its return, for an idle server with the default "
            "`poll_interval=0.5` (median of the runs).",
            "",
            "| server | median ms | max ms |",
            "|---|---:|---:|",
        ]
        for row, figures in results.shutdown.items():
            lines.append(f"| {row} | {figures['median_ms']:.2f} | {figures['max_ms']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def chart(results: Results, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    table = summarise(results)
    scenarios = [s for s in table if s != IDLE.name]
    rows = sorted({row for s in scenarios for row in table[s]})
    fig, axes = plt.subplots(
        len(scenarios), 1, figsize=(10, 2.2 + 0.32 * len(rows) * len(scenarios))
    )
    if len(scenarios) == 1:
        axes = [axes]
    for ax, scenario in zip(axes, scenarios, strict=True):
        present = [r for r in rows if r in table[scenario]]
        values = [table[scenario][r]["rps"] for r in present]
        colours = ["#d62728" if r.startswith("netserve") else "#7f7f7f" for r in present]
        ax.barh(present, values, color=colours)
        ax.set_title(scenario, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.set_xlabel("requests/s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write(results: Results, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stamp = results.started.replace(":", "")
    raw = {
        "plan": results.plan_name,
        "started": results.started,
        "machine": results.machine,
        "skipped": results.skipped,
        "runs": [
            {"scenario": scenario, "row": row, "rounds": runs}
            for (scenario, row), runs in results.runs.items()
        ],
        "summary": summarise(results),
        "shutdown": results.shutdown,
    }
    (out / f"{stamp}-{results.plan_name}.json").write_text(json.dumps(raw, indent=1))
    (out / "latest.json").write_text(json.dumps(raw, indent=1))
    report = out / "latest.md"
    report.write_text(markdown(results))
    chart(results, out / "latest.png")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    for name in PLANS:
        group.add_argument(f"--{name}", dest="plan", action="store_const", const=name)
    parser.add_argument("--rows", help="comma-separated rows to run (default: the plan's)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results are written")
    args = parser.parse_args(argv)
    name = args.plan or "quick"
    rows = args.rows.split(",") if args.rows else None
    if rows:
        unknown = set(rows) - set(ALL_ROWS)
        if unknown:
            parser.error(f"unknown rows: {', '.join(sorted(unknown))}")
    started = time.monotonic()
    results = run_plan(name, PLANS[name], rows)
    report = write(results, args.out)
    print(report.read_text())
    print(f"({time.monotonic() - started:.0f} s; results in {args.out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
