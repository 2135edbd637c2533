#!/usr/bin/env python3
"""Prints the markdown tables of BENCHMARKS.md from bench/results/*.json.

Usage:
  bench/tables.py [RESULTS_DIR]                     print every table
  bench/tables.py --splice BENCHMARKS.md [RESULTS_DIR]
      replace what stands between `<!-- tables:SCENARIO:begin -->` and
      `<!-- tables:SCENARIO:end -->` in the file with SCENARIO's tables;
      results in a subfolder (e.g. `results/after-hardening/fanout.json`)
      go between `<!-- tables:after-hardening/fanout:begin -->` and its end,
      and stay out of the summary

Standard library only.
"""
import json
import math
import sys
from pathlib import Path

# Per scenario: (metric key, column title, scale factor) shown in its table.
COLUMNS = {
    "polling": [
        ("updates", "updates received", 1),
        ("calls", "calls", 1),
        ("server_cpu_ms", "server CPU (ms)", 1),
        ("cpu_us_per_update", "CPU µs / update", 1),
        ("wire_bytes", "wire bytes", 1),
        ("bytes_per_update", "bytes / update", 1),
    ],
    "fanout": [
        ("setup_s", "setup (s)", 1),
        ("reach_p50_us", "reach p50 (ms)", 1e-3),
        ("reach_p99_us", "reach p99 (ms)", 1e-3),
        ("reach_max_us", "reach max (ms)", 1e-3),
        ("deliveries_per_s", "deliveries/s", 1),
        ("samples_per_s", "samples/s", 1),
        ("server_cpu_pct", "server CPU %", 1),
        ("load_cpu_pct", "load CPU %", 1),
        ("cpu_ns_per_delivery", "CPU ns / delivery", 1),
        ("mem_per_sub_bytes", "bytes / subscription", 1),
        ("server_hwm_kib", "server peak RSS (MiB)", 1 / 1024),
    ],
    "upload": [
        ("mib_per_s", "MiB/s", 1),
        ("seconds", "seconds", 1),
        ("server_cpu_pct", "server CPU %", 1),
        ("server_hwm_kib", "server peak RSS (MiB)", 1 / 1024),
    ],
    "chat": [
        ("acked_per_s", "acked msgs/s", 1),
        ("deliveries_per_s", "deliveries/s", 1),
        ("delivered_fraction", "delivered", 1),
        ("latency_p50_us", "p50 (ms)", 1e-3),
        ("latency_p99_us", "p99 (ms)", 1e-3),
        ("members_cut_off", "cut off", 1),
        ("server_cpu_pct", "server CPU %", 1),
        ("best_deliveries_per_s_p99_under_50ms", "best deliveries/s, p99 < 50 ms", 1),
        ("knee_rate_msgs_per_s", "rate where p99 > 50 ms", 1),
    ],
    "security": [
        ("deliveries_per_s", "deliveries/s", 1),
        ("reach_p99_us", "reach p99 (ms)", 1e-3),
        ("cpu_ns_per_delivery", "CPU ns / delivery", 1),
        ("mib_per_s", "MiB/s", 1),
        ("acked_per_s", "acked msgs/s", 1),
        ("latency_p50_us", "chat p50 (ms)", 1e-3),
        ("latency_p99_us", "chat p99 (ms)", 1e-3),
        ("server_cpu_pct", "server CPU %", 1),
    ],
    "dashboard": [
        ("samples_per_s", "samples/s", 1),
        ("expected_per_s", "expected/s", 1),
        ("server_cpu_pct", "server CPU %", 1),
        ("cpu_us_per_sample", "CPU µs / sample", 1),
        ("server_rss_kib", "server RSS (MiB)", 1 / 1024),
        ("errors", "errors", 1),
    ],
    "cluster": [
        ("deliveries_per_s", "deliveries/s", 1),
        ("server_cpu_pct", "server CPU % (all)", 1),
        ("deliveries_per_core_s", "deliveries/s per core", 1),
        ("reach_p50_us", "reach p50 (ms)", 1e-3),
        ("reach_p99_us", "reach p99 (ms)", 1e-3),
        ("acked_per_s", "acked msgs/s", 1),
        ("latency_p50_us", "chat p50 (ms)", 1e-3),
        ("latency_p99_us", "chat p99 (ms)", 1e-3),
    ],
    "latency": [
        ("latency_p50_us", "p50 (µs)", 1),
        ("latency_p99_us", "p99 (µs)", 1),
        ("latency_max_us", "max (µs)", 1),
        ("latency_count", "samples", 1),
    ],
}


def fmt(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def table(report):
    scenario = report["scenario"]
    columns = COLUMNS.get(scenario)
    rows = report["rows"]
    config_keys = sorted({k for r in rows for k in r["config"]})
    if columns is None:
        keys = sorted({k for r in rows for k in r["median"]})
        columns = [(k, k, 1) for k in keys]
    out = []
    head = ["target"] + config_keys + [title for _, title, _ in columns]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join(["---"] * len(head)) + "|")
    for r in rows:
        cells = [r["target"]] + [r["config"].get(k, "") for k in config_keys]
        if r.get("error"):
            cells.append("not measured: " + r["error"].replace("\n", " ").replace("|", "/")[:160])
            cells += [""] * (len(columns) - 1)
        else:
            for key, _, scale in columns:
                v = r["median"].get(key)
                cells.append(fmt(v * scale if v is not None else None))
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    if report.get("checks"):
        out.append("| target from the issue | goal | measured | met |")
        out.append("|---|---|---|---|")
        for c in report["checks"]:
            met = "yes" if c["met"] else ("**no**" if c["value"] is not None else "not measured")
            out.append(f"| {c['name']} | {c['goal']} | {fmt(c['value'])} | {met} |")
        out.append("")
    return "\n".join(out)


def section(path, report, prefix=""):
    m = report["machine"]
    return (
        f"_From `bench/results/{prefix}{path.name}`: run {report['started_at']}, {report['elapsed_s']:.0f} s; "
        f"{m['nproc']} × {m['cpu_model']}, load average at start {m['loadavg'].split()[0]}; "
        f"server on CPU {report['pinning']['server']}, load generator on CPU {report['pinning']['load']}; "
        f"medians of the runs; settings `{json.dumps(report['settings'], ensure_ascii=False)}`._\n\n"
        + table(report)
    )


def summary(reports):
    out = ["| scenario | target from the issue | goal | measured | met |", "|---|---|---|---|---|"]
    for _, report in reports:
        for c in report.get("checks", []):
            met = "yes" if c["met"] else ("**no**" if c["value"] is not None else "not measured")
            out.append(f"| {report['scenario']} | {c['name']} | {c['goal']} | {fmt(c['value'])} | {met} |")
    return "\n".join(out) + "\n\n"


def main():
    args = sys.argv[1:]
    splice = None
    if args[:1] == ["--splice"]:
        splice = Path(args[1])
        args = args[2:]
    results = Path(args[0]) if args else Path(__file__).parent / "results"
    order = ["polling", "fanout", "upload", "chat", "latency", "security", "dashboard", "cluster"]
    files = sorted(results.glob("*.json"), key=lambda p: (order.index(p.stem) if p.stem in order else 99, p.stem))
    reports = [(path, json.loads(path.read_text())) for path in files]
    extra = [
        (f"{sub.name}/", path, json.loads(path.read_text()))
        for sub in sorted(p for p in results.iterdir() if p.is_dir())
        for path in sorted(sub.glob("*.json"))
    ]
    if splice:
        text = splice.read_text()
        begin, end = "<!-- tables:summary:begin -->", "<!-- tables:summary:end -->"
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            _, tail = rest.split(end, 1)
            text = head + begin + "\n" + summary(reports) + end + tail
        for prefix, path, report in [("", p, r) for p, r in reports] + extra:
            begin = f"<!-- tables:{prefix}{report['scenario']}:begin -->"
            end = f"<!-- tables:{prefix}{report['scenario']}:end -->"
            if begin in text and end in text:
                head, rest = text.split(begin, 1)
                _, tail = rest.split(end, 1)
                text = head + begin + "\n" + section(path, report, prefix) + end + tail
        splice.write_text(text)
        return
    for path, report in reports:
        print(f"### {report['scenario']}\n")
        print(section(path, report))


if __name__ == "__main__":
    main()
