"""Turn raw measurements into results: medians, ratios to the references, targets, Markdown, PNG.

Every figure of every target is divided by the same figure of ``raw-websockets``
and of ``socketio`` measured in the same run; the targets of the issue are
checked on those ratios (docs/benchmarks.md: absolute numbers drift between
machines, ratios measured side by side do not).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["build", "chart", "markdown"]

RAW, SIO = "raw-websockets", "socketio"
X = "\N{MULTIPLICATION SIGN}"
NA = "\N{EN DASH}"  # a figure that was not measured
# Figures divided by the references, per workload.
RATIO_KEYS = {
    "roundtrip": ("per_s", "p50_ms", "p99_ms", "hub_cpu_us_per_op"),
    "fanout": ("per_s", "hub_cpu_us_per_op"),
    "idle": ("kib_per_agent", "connect_s"),
    "redis": (),
    "storm": (),
}
# Workloads measured on our hub alone (no reference targets).
OURS_ONLY = {"storm": ("ours-redis",)}
STORM_P99_GOAL_MS = 250.0


def _median_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r and "skipped" not in r]
    if not ok:
        return dict(runs[-1])
    out: dict[str, Any] = {}
    for key in ok[0]:
        values = [r.get(key) for r in ok]
        nums = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if nums and len(nums) == len(values):
            out[key] = statistics.median(nums)
        else:
            out[key] = values[-1]
    out["runs"] = len(ok)
    if len(ok) > 1 and "per_s" in out:
        out["per_s_runs"] = [r["per_s"] for r in ok]
    failed = [r["error"] for r in runs if "error" in r]
    if failed:
        out["failed_runs"] = failed
    return out


def _num(entry: dict[str, Any] | None, key: str) -> float | None:
    if not entry:
        return None
    v = entry.get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def build(meta: dict[str, Any], raw: dict[str, Any], workloads: list[str],
          targets: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {"meta": meta, "workloads": {}}
    for workload in workloads:
        scenarios: dict[str, Any] = {}
        for sc, per_target in raw.get(workload, {}).items():
            measured = OURS_ONLY.get(workload, targets)
            row = {t: _median_runs(per_target[t]) for t in measured if t in per_target}
            for t in measured:
                row.setdefault(t, {"error": "not measured"})
            for entry in row.values():
                for key in RATIO_KEYS[workload]:
                    v = _num(entry, key)
                    if v is None:
                        continue
                    entry.setdefault("vs_raw", {})[key] = _ratio(v, _num(row.get(RAW), key))
                    entry.setdefault("vs_sio", {})[key] = _ratio(v, _num(row.get(SIO), key))
            scenarios[sc] = row
        results["workloads"][workload] = scenarios
    ran = set(results["workloads"])
    results["targets"] = [t for t in _targets(results) if t["workload"] in ran]
    return results


def _get(results: dict[str, Any], workload: str, sc: str, target: str) -> dict[str, Any] | None:
    entry = results["workloads"].get(workload, {}).get(sc, {}).get(target)
    return entry if isinstance(entry, dict) else None


def _targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each checked on ratios measured in this run."""
    out: list[dict[str, Any]] = []

    def ratio_target(tid: str, text: str, workload: str, sc: str, key: str, ref: str,
                     goal: float, cmp: Callable[[float, float], bool], target: str) -> None:
        entry = _get(results, workload, sc, target)
        value = cpu_equivalent = None
        if entry is not None:
            ratios = entry.get("vs_raw" if ref == RAW else "vs_sio") or {}
            value = ratios.get(key)
            cost = ratios.get("hub_cpu_us_per_op")
            if key == "per_s" and cost:
                # What the ratio would be if both servers were CPU-bound on a quiet machine.
                cpu_equivalent = 1 / cost
        out.append({"id": tid, "text": text, "target": target, "value": value, "goal": goal,
                    "met": None if value is None else cmp(value, goal),
                    "cpu_equivalent": cpu_equivalent, "workload": workload})

    def ge(a: float, b: float) -> bool:
        return a >= b

    def le(a: float, b: float) -> bool:
        return a <= b

    rt = f"100 agents {X} 10 in flight: round trips/s"
    ratio_target("rt-memory-vs-raw", f"in-memory, {rt} >= 0.75 {X} raw websockets",
                 "roundtrip", "100x10", "per_s", RAW, 0.75, ge, "ours-memory")
    ratio_target("rt-memory-vs-sio", f"in-memory, {rt} >= 3.5 {X} python-socketio",
                 "roundtrip", "100x10", "per_s", SIO, 3.5, ge, "ours-memory")
    ratio_target("rt-redis-vs-raw", f"Redis engine, {rt} >= 0.40 {X} raw websockets",
                 "roundtrip", "100x10", "per_s", RAW, 0.40, ge, "ours-redis")
    ratio_target("p50-memory-vs-raw",
                 f"in-memory, one command in flight: p50 latency <= 1.25 {X} raw websockets",
                 "roundtrip", "1x1", "p50_ms", RAW, 1.25, le, "ours-memory")
    ratio_target("fanout-memory-vs-raw",
                 f"fan-out to 1,000 agents: deliveries/s >= 0.8 {X} raw websockets",
                 "fanout", "fanout", "per_s", RAW, 0.8, ge, "ours-memory")
    ratio_target("fanout-memory-vs-sio",
                 f"fan-out to 1,000 agents: deliveries/s >= 4 {X} python-socketio",
                 "fanout", "fanout", "per_s", SIO, 4.0, ge, "ours-memory")
    idle = results["workloads"].get("idle", {})
    largest = max(idle, key=int) if idle else "10000"
    ratio_target("idle-memory-vs-raw", f"idle agents ({largest}): hub memory per agent "
                 f"<= 1.5 {X} a bare websockets connection", "idle", largest, "kib_per_agent",
                 RAW, 1.5, le, "ours-memory")
    for target in ("ours-memory", "ours-redis"):
        entry = _get(results, "idle", largest, target)
        n = _num(entry, "agents")
        out.append({"id": f"agents-{target}", "text": f"{largest} agents on one hub process",
                    "target": target, "value": n, "goal": int(largest),
                    "met": None if n is None else n >= int(largest), "workload": "idle"})
    for sc in results["workloads"].get("storm", {}):
        entry = _get(results, "storm", sc, "ours-redis")
        ok = entry is not None and "error" not in entry
        p99 = _num((entry or {}).get("calm", {}).get("storm") if ok else None, "p99_ms")
        out.append({"id": "storm-calm-p99", "workload": "storm", "target": "ours-redis",
                    "text": f"reconnect storm ({sc} agents): the surviving hub's calm agents' "
                    f"p99 round trip during the storm <= {STORM_P99_GOAL_MS:g} ms",
                    "value": p99, "goal": STORM_P99_GOAL_MS,
                    "met": None if p99 is None else p99 <= STORM_P99_GOAL_MS})
        back = _num(entry, "registered_on_b_end") if ok else None
        out.append({"id": "storm-all-back", "workload": "storm", "target": "ours-redis",
                    "text": f"reconnect storm: all {sc} agents registered on the surviving hub",
                    "value": back, "goal": int(sc),
                    "met": None if back is None else back >= int(sc)})
    return out


# -- Markdown -------------------------------------------------------------------------

def _f(v: Any, digits: int = 0, unit: str = "") -> str:
    if not isinstance(v, int | float) or isinstance(v, bool):
        return NA
    if digits == 0:
        return f"{v:,.0f}{unit}"
    return f"{v:,.{digits}f}{unit}"


def _r(entry: dict[str, Any], ref: str, key: str) -> str:
    v = (entry.get("vs_raw" if ref == RAW else "vs_sio") or {}).get(key)
    return NA if v is None else f"{v:.2f}{X}"


def _err(entry: dict[str, Any]) -> str | None:
    if "error" in entry:
        return "error: " + str(entry["error"]).replace("|", "/")[:160]
    if "skipped" in entry:
        return "n/a: " + str(entry["skipped"])
    return None


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    plan = meta["plan"]
    v = meta["versions"]
    runs = f"median of {plan['repeat']} runs" if plan["repeat"] > 1 else "one run"
    compared = any(x in results["workloads"] for x in ("roundtrip", "fanout", "idle", "redis"))
    lines = [
        "# Benchmark results", "",
        f"`{meta['command']}` — {meta['date']}, {meta['machine']['cpus']} CPUs "
        f"({meta['machine']['cpu']}), {meta['machine']['platform']}; event loop: {meta['loop']} "
        "in every process.",
        f"Hub code: commit {meta['git']['commit']}"
        + (f" plus uncommitted changes (digest {meta['git']['hub_diff_digest']})"
           if meta["git"]["hub_code_dirty"] else "") + ".",
        f"Python {v['python']}, websockets {v['websockets']}, python-socketio "
        f"{v['python-socketio']}, msgpack {v['msgpack']}, redis-py {v['redis-py']}, "
        f"redis-server {v['redis-server'] or NA}, uvloop {v['uvloop'] or NA}.",
        (f"Each window: {plan['warmup_s']:g} s warm-up, then {plan['duration_s']:g} s measured; "
         f"round trips and fan-out: {runs} per target; a window during which other processes "
         f"took more than {plan.get('max_noise', 0):g} core is run again (up to "
         f"{plan.get('retries', 0)} more times) and the quietest attempt kept. "
         if compared else "")
        + f"Total wall time {meta['wall_s']:.0f} s."
        + (f" CPUs pinned: server {plan['cpus']['server']}, load generators "
           f"{plan['cpus']['clients']}, redis-server {plan['cpus']['redis']}."
           if plan.get("cpus", {}).get("server") else "")
        + (" **Quick smoke run: sizes scaled down, figures meaningless.**" if plan["quick"]
           else ""),
        "",
    ]
    if compared:
        lines += [
            "Our hub runs with `HubConfig` defaults (admin API off) except the per-connection "
            "frame-rate limit (`max_frame_rate`, 20,000 frames/s by default), switched off: it "
            "drops frames past the limit, which one agent with 100 commands in flight can "
            "reach. Hub in one process, agents in load-generator processes, all on loopback; "
            "ratios are this target's figure divided by the same figure of the reference in "
            "this run (for latency, memory and connect time lower is better).",
            "",
        ]
    w = results["workloads"]
    if "roundtrip" in w:
        lines += ["## 1. Command round trips (execute on agent → result)", "",
                  "| scenario | target | round trips/s | ÷ raw ws | ÷ socketio | p50 ms | "
                  "p50 ÷ raw | p99 ms | p99 ÷ raw | hub CPU µs/cmd | ÷ raw | hub CPU | hub GC | "
                  "loadgen CPU | other CPU |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for sc, row in w["roundtrip"].items():
            agents, inflight = plan["scenarios"][sc]
            label = _scenario_label(agents, inflight)
            for t, e in row.items():
                err = _err(e)
                if err:
                    lines.append(f"| {label} | {t} | {err} |" + " |" * 12)
                    continue
                lines.append(
                    f"| {label} | {t} | {_f(e.get('per_s'))} | {_r(e, RAW, 'per_s')} | "
                    f"{_r(e, SIO, 'per_s')} | {_f(e.get('p50_ms'), 3)} | {_r(e, RAW, 'p50_ms')} | "
                    f"{_f(e.get('p99_ms'), 3)} | {_r(e, RAW, 'p99_ms')} | "
                    f"{_f(e.get('hub_cpu_us_per_op'), 1)} | {_r(e, RAW, 'hub_cpu_us_per_op')} | "
                    f"{_pct(e.get('hub_cpu_util'))} | "
                    f"{_pct(e.get('gc_util'))} | {_pct(e.get('loadgen_cpu_util'))} | "
                    f"{_pct(e.get('other_cpu_util'))} |")
        lines += ["", "hub CPU µs/cmd: the server process's CPU time per command (less "
                  "sensitive to other load on the machine than throughput; its ratio to raw "
                  "websockets is a cost ratio, lower is better); "
                  "hub CPU: the server process's CPU time ÷ window (100% = one core "
                  "saturated); hub GC: share of the window the server spent in Python's cyclic "
                  "garbage collector; loadgen CPU: the load generators'; other CPU: every other "
                  "process on the machine meanwhile (noise; high values make that row "
                  "unreliable).", ""]
    if "fanout" in w:
        lines += ["## 2. Event fan-out (one event to every connected agent, repeatedly)", "",
                  f"{plan['fanout_agents']} agents in {plan['fanout_procs']} load-generator "
                  f"process(es); at most {plan['fanout_window']} events ahead of the slowest "
                  "agent (receivers report fully received rounds over a side channel, the same "
                  "for every target).", "",
                  "| target | deliveries/s | ÷ raw ws | ÷ socketio | hub CPU µs/delivery | "
                  "÷ raw | hub CPU | hub GC | loadgen CPU | other CPU |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for t, e in w["fanout"].get("fanout", {}).items():
            err = _err(e)
            if err:
                lines.append(f"| {t} | {err} |" + " |" * 8)
                continue
            lines.append(f"| {t} | {_f(e.get('per_s'))} | {_r(e, RAW, 'per_s')} | "
                         f"{_r(e, SIO, 'per_s')} | {_f(e.get('hub_cpu_us_per_op'), 2)} | "
                         f"{_r(e, RAW, 'hub_cpu_us_per_op')} | "
                         f"{_pct(e.get('hub_cpu_util'))} | {_pct(e.get('gc_util'))} | "
                         f"{_pct(e.get('loadgen_cpu_util'))} | {_pct(e.get('other_cpu_util'))} |")
        lines.append("")
    if "idle" in w:
        lines += ["## 3. Idle scale (connected agents doing nothing)", "",
                  f"Agents connected in stages from {plan['idle_per_proc']}-agent load-generator "
                  "processes; hub RSS (psutil, after `gc.collect()`) before the first agent and "
                  "after each stage; per agent = growth ÷ agents.", "",
                  "| agents | target | connected | KiB/agent | ÷ raw ws | ÷ socketio | hub RSS MiB "
                  "| connect s (stage) | ÷ raw ws | hub CPU ms/connect |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for sc, row in w["idle"].items():
            for t, e in row.items():
                err = _err(e)
                if err:
                    lines.append(f"| {sc} | {t} | {err} |" + " |" * 7)
                    continue
                lines.append(
                    f"| {sc} | {t} | {_f(e.get('agents'))} | {_f(e.get('kib_per_agent'), 1)} | "
                    f"{_r(e, RAW, 'kib_per_agent')} | {_r(e, SIO, 'kib_per_agent')} | "
                    f"{_f(e.get('rss_mib'), 1)} | {_f(e.get('connect_s'), 2)} | "
                    f"{_r(e, RAW, 'connect_s')} | {_f(e.get('hub_cpu_ms_per_connect'), 3)} |")
        lines.append("")
    if "redis" in w:
        lines += ["## 4. Redis round trips per command lifecycle", "",
                  "Exact counts over a fixed number of commands (`hub.store.round_trips`: "
                  "pipelined writes; `hub.store.operations`: commands and script calls in them); "
                  "the deadline sweeper's one call per second is included.", "",
                  "| scenario | target | commands | round trips/cmd | operations/cmd | "
                  "commands/s | hub CPU µs/cmd |", "|---|---|---|---|---|---|---|"]
        for sc, row in w["redis"].items():
            for t, e in row.items():
                err = _err(e)
                agents, inflight, _ = plan["lifecycle"][sc]
                label = _scenario_label(agents, inflight)
                if err:
                    lines.append(f"| {label} | {t} | {err} |" + " |" * 4)
                    continue
                lines.append(
                    f"| {label} | {t} | {_f(e.get('commands'))} | "
                    f"{_f(e.get('store_round_trips_per_command'), 3)} | "
                    f"{_f(e.get('store_operations_per_command'), 3)} | {_f(e.get('per_s'))} | "
                    f"{_f(e.get('hub_cpu_us_per_op'), 1)} |")
        if "roundtrip" in w:
            lines += ["", "During the round-trip windows (ours-redis): "
                      + "; ".join(
                          f"{sc}: {_f(e.get('store_round_trips_per_command'), 3)} round trips, "
                          f"{_f(e.get('store_operations_per_command'), 3)} operations per command"
                          for sc, row in w["roundtrip"].items()
                          if (e := row.get("ours-redis")) and not _err(e)) + "."]
        lines.append("")
    if "storm" in w:
        lines += _storm_markdown(w["storm"])
    if results.get("profiles"):
        lines += ["## Where our hub's CPU goes (py-spy, `--profile`)", "",
                  "Self time of the hub process by layer during the measured window, as µs of "
                  "hub CPU per operation (command or delivery); details and collapsed stacks in "
                  "`profiles/`.", ""]
        for name, prof in results["profiles"].items():
            if not prof.get("samples"):
                continue
            per = prof.get("us_per_op")
            head = f"**{name}** ({prof['samples']} samples"
            head += f", {per:.1f} µs/op)" if per else ")"
            parts = [f"{row['name']} {100 * row['share']:.0f}%"
                     + (f" ({row['us_per_op']:.1f} µs)" if row["us_per_op"] is not None else "")
                     for row in prof["layers"][:8]]
            lines.append(f"- {head}: " + "; ".join(parts))
        lines.append("")
    lines += ["## Targets (ratios measured in this run)" if compared else "## Targets", ""]
    for tg in results["targets"]:
        state = {True: "**met**", False: "**not met**", None: "not measured"}[tg["met"]]
        value = tg["value"]
        if value is None:
            shown = NA
        elif tg["id"].startswith("agents-"):
            shown = f"{value:,.0f} connected"
        elif tg["id"] == "storm-calm-p99":
            shown = f"{value:.1f} ms"
        elif tg["id"] == "storm-all-back":
            shown = f"{value:,.0f} registered"
        else:
            shown = f"{value:.2f}{X} (goal {tg['goal']:g})"
        extra = ""
        if tg.get("cpu_equivalent") is not None:
            extra = (f" (by hub CPU per operation instead of throughput: "
                     f"{tg['cpu_equivalent']:.2f}{X})")
        lines.append(f"- {tg['text']} ({tg['target']}): {shown} — {state}{extra}")
    lines.append("")
    return "\n".join(lines)


def _storm_markdown(rows: dict[str, Any]) -> list[str]:
    lines = ["## 5. Reconnect storm (a hub killed, its agents move to the other)", "",
             "Two hubs (`dispatcher serve`, Redis engine) pinned to one CPU; N "
             "`agent_client.Agent`s on hub A (URL list [A, B], the library's backoff), calm "
             "agents on hub B answering commands sent on a fixed schedule by an application "
             "process (an embedded `Dispatcher`, a third hub without agents). Hub A gets "
             "SIGKILL; *reconnect* is the time from the kill until Redis lists every agent on "
             "hub B (`P:hub:B:agents`, sampled every 100 ms); handshakes/s: registrations on "
             "hub B per 100 ms and per second (the same samples); refused: HTTP 503s of hub B "
             "(`max_handshakes`), from its log; hub B waited: seconds its main thread was "
             "runnable but waited for a CPU (taken by other processes: noise). Calm latency: "
             "scheduled submit to result, before the kill and from the kill until every agent "
             "is back.", "",
             "| agents | reconnect s | peak handshakes/s (100 ms / 1 s) | mean/s | refused | "
             "registered on B at the end | calm p50 / p99 ms before | calm p50 / p99 / max ms "
             "during | calm errors during | hub B CPU during | hub B waited s | other CPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for sc, row in rows.items():
        e = row.get("ours-redis", {})
        err = _err(e)
        if err:
            lines.append(f"| {sc} | {err} |" + " |" * 10)
            continue
        before, during = e["calm"]["before"], e["calm"]["storm"]
        lines.append(
            f"| {sc} | {_f(e.get('reconnect_s'), 2)} | "
            f"{_f(e.get('peak_handshakes_per_s_100ms'))} / {_f(e.get('peak_handshakes_per_s_1s'))}"
            f" | {_f(e.get('mean_handshakes_per_s'))} | {_f(e.get('refused'))} | "
            f"{_f(e.get('registered_on_b_end'))} | {_f(before.get('p50_ms'), 1)} / "
            f"{_f(before.get('p99_ms'), 1)} | {_f(during.get('p50_ms'), 1)} / "
            f"{_f(during.get('p99_ms'), 1)} / {_f(during.get('max_ms'), 1)} | "
            f"{during.get('errors', 0)} of {during.get('n', 0)} | "
            f"{_pct(e.get('hub_b_cpu_util'))} | {_f(e.get('hub_b_runqueue_wait_s'), 2)} | "
            f"{_pct(e.get('other_cpu_util'))} |")
        lines += ["", f"Settings: `max_handshakes` {e.get('max_handshakes')}, agents' backoff "
                  f"{e['backoff']['initial_s']:g} s doubling to {e['backoff']['max_s']:g} s, "
                  f"{e.get('calm_agents')} calm agents at {_f(e.get('calm_rate_per_s'))} "
                  f"commands/s, `hub_ttl` {e.get('hub_ttl_s'):g} s. The agents' own view of "
                  f"the reconnect (their welcome from B): p50 "
                  f"{_f(e['reconnect_agents_view'].get('p50_s'), 2)} s, p99 "
                  f"{_f(e['reconnect_agents_view'].get('p99_s'), 2)} s; hub A reaped after "
                  f"{_f(e.get('reap_s'), 1)} s; calm p99 after the storm "
                  f"{_f(e['calm']['after'].get('p99_ms'), 1)} ms; redis-server CPU during "
                  f"{_pct(e.get('redis_cpu_util'))}, load generators "
                  f"{_pct(e.get('loadgen_cpu_util'))} (nice 10); TCP listen-queue overflows "
                  f"on the machine during the storm: {_f(e.get('listen_overflows'))}.", ""]
    return lines


def _scenario_label(agents: int, inflight: int) -> str:
    return (f"{agents} agent{'s' if agents > 1 else ''} {X} {inflight} "
            "in flight")


def _pct(v: Any) -> str:
    return NA if not isinstance(v, int | float) else f"{100 * v:.0f}%"


# -- chart --------------------------------------------------------------------------------

COLORS = {"ours-memory": "#1f77b4", "ours-redis": "#17becf", "raw-websockets": "#7f7f7f",
          "socketio": "#ff7f0e"}


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    w = results["workloads"]
    targets = results["meta"]["targets"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    title = "dispatcher benchmarks: " + results["meta"]["date"]
    if results["meta"]["plan"]["quick"]:
        title += " (quick smoke run: not meaningful)"
    fig.suptitle(title)

    def grouped(ax: Any, workload: str, key: str, ylabel: str, title: str,
                log: bool = False) -> None:
        scenarios = list(w.get(workload, {}))
        width = 0.8 / max(1, len(targets))
        for i, t in enumerate(targets):
            xs, ys = [], []
            for j, sc in enumerate(scenarios):
                v = _num(w[workload][sc].get(t), key)
                if v is not None:
                    xs.append(j + i * width)
                    ys.append(v)
            ax.bar(xs, ys, width, label=t, color=COLORS.get(t))
        ax.set_xticks([j + width * (len(targets) - 1) / 2 for j in range(len(scenarios))])
        ax.set_xticklabels(scenarios)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        if not scenarios:
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)

    grouped(axes[0][0], "roundtrip", "per_s", "round trips/s",
            f"Round trips/s (agents {X} in flight)")
    grouped(axes[0][1], "roundtrip", "p50_ms", "ms", "p50 latency (log)", log=True)
    grouped(axes[0][2], "fanout", "per_s", "deliveries/s", "Fan-out deliveries/s")
    grouped(axes[1][0], "idle", "kib_per_agent", "KiB", "Hub RSS per idle agent")
    grouped(axes[1][1], "idle", "connect_s", "s", "Time to connect (per stage)")
    ax = axes[1][2]
    rows = w.get("redis", {})
    labels = list(rows)
    for i, (key, name, color) in enumerate((
            ("store_round_trips_per_command", "round trips", "#17becf"),
            ("store_operations_per_command", "operations", "#9edae5"))):
        values = [_num(rows[sc].get("ours-redis"), key) or 0.0 for sc in labels]
        bars = ax.bar([j + i * 0.4 for j in range(len(labels))], values, 0.4, label=name,
                      color=color)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks([j + 0.2 for j in range(len(labels))])
    ax.set_xticklabels(labels)
    ax.set_title("Redis per command (ours-redis)")
    ax.legend(fontsize=8)
    if not labels:
        ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
