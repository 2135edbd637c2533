#!/usr/bin/env python3
"""Turns bench/results/*.json into one PNG per scenario under bench/plots/.

Run through bench/plot.sh, which installs matplotlib into bench/.venv.
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
COLORS = {
    "streamhub": "#d95f02",
    "python": "#1b9e77",
    "node": "#7570b3",
    "nats": "#666666",
    "tcp": "#999999",
    "iperf3": "#999999",
    "dd": "#bbbbbb",
}


def ok_rows(report):
    return [r for r in report["rows"] if not r.get("error")]


def plot_polling(report, ax_list):
    rows = ok_rows(report)
    for ax, (metric, title) in zip(ax_list, [("cpu_us_per_update", "server CPU µs per update received"),
                                             ("bytes_per_update", "wire bytes per update received")]):
        labels, values, colors = [], [], []
        for r in rows:
            v = r["median"].get(metric)
            if v is None:
                continue
            labels.append(f"{r['target']}\n{r['config']['variant']}\n{r['config']['mode']}")
            values.append(v)
            colors.append(COLORS.get(r["target"], "#333"))
        bars = ax.bar(range(len(values)), values, color=colors)
        for bar, r_label in zip(bars, labels):
            if "polling" in r_label:
                bar.set_hatch("//")
        ax.set_xticks(range(len(values)), labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_title(title + " (hatched: polling; log scale)")


def plot_fanout(report, ax_list):
    rows = ok_rows(report)
    targets = sorted({r["target"] for r in rows}, key=list(COLORS).index)
    for ax, (metric, title, scale) in zip(ax_list, [
        ("deliveries_per_s", "deliveries per second at saturation", 1),
        ("reach_p99_us", "one sample reaching every subscriber, p99 (ms)", 1e-3),
        ("mem_per_sub_bytes", "server memory per idle subscription (bytes)", 1),
    ]):
        for t in targets:
            pts = sorted((int(r["config"]["subscribers"]), r["median"].get(metric)) for r in rows if r["target"] == t)
            pts = [(x, y * scale) for x, y in pts if y is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=t, color=COLORS.get(t))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("subscribers")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)


def plot_latency(report, ax_list):
    rows = ok_rows(report)
    ax = ax_list[0]
    labels = [r["target"] for r in rows]
    x = range(len(rows))
    for offset, (metric, name) in zip((-0.2, 0.2), [("latency_p50_us", "p50"), ("latency_p99_us", "p99")]):
        ax.bar([i + offset for i in x], [r["median"].get(metric, 0) for r in rows], width=0.4,
               label=name, color=[COLORS.get(t, "#333") for t in labels], alpha=1.0 if name == "p50" else 0.5)
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("µs")
    ax.set_title("publish-to-receipt latency vs TCP ping-pong round trip (solid p50, light p99)")


def plot_upload(report, ax_list):
    rows = ok_rows(report)
    ax = ax_list[0]
    limits = {(r["target"], r["config"]["storage"]): r["median"].get("mib_per_s") for r in rows
              if r["target"] in ("iperf3", "dd", "sha256", "store")}
    for storage, style in (("disk", "-"), ("tmpfs", "--")):
        for t in ("streamhub", "python", "node"):
            pts = [(r["config"]["chunk"], r["median"].get("mib_per_s")) for r in rows
                   if r["target"] == t and r["config"].get("storage") == storage and "file" not in r["config"]]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o" + style, color=COLORS.get(t),
                        label=f"{t} ({storage})")
    for (t, storage), v in limits.items():
        if v:
            style = {"dd": ":", "iperf3": "-.", "sha256": "--"}.get(t, (0, (1, 3)))
            ax.axhline(v, color="#999", linestyle=style, linewidth=1)
            ax.annotate(f"{t} {storage}: {v:.0f}", (0, v), fontsize=7, color="#555")
    ax.set_ylabel("MiB/s")
    ax.set_xlabel("chunk size")
    ax.set_title("single-stream upload, SHA-256 + fsync (lines: iperf3 loopback, dd conv=fsync,\n"
                 "SHA-256 alone, the store alone fed from memory)", fontsize=9)
    ax.legend(fontsize=7)
    ax = ax_list[1]
    big = [r for r in rows if "file" in r["config"]]
    ax.bar(range(len(big)), [r["median"].get("server_hwm_kib", 0) / 1024 for r in big],
           color=[COLORS.get(r["target"], "#333") for r in big])
    ax.set_xticks(range(len(big)), [r["target"] for r in big])
    ax.axhline(64, color="red", linestyle="--", linewidth=1)
    ax.set_ylabel("MiB")
    ax.set_title("server peak RSS over a " + (big[0]["config"]["file"] if big else "") + " upload (red: 64 MiB target)",
                 fontsize=9)


def plot_chat(report, ax_list):
    rows = [r for r in ok_rows(report) if r["config"].get("rate") != "summary"]
    targets = sorted({r["target"] for r in rows}, key=list(COLORS).index)
    for ax, (metric, title, scale) in zip(ax_list, [
        ("deliveries_per_s", "deliveries per second", 1),
        ("latency_p99_us", "send-to-receipt p99 (ms; red: 50 ms)", 1e-3),
    ]):
        for t in targets:
            pts = sorted((float(r["config"]["rate"]), r["median"].get(metric)) for r in rows if r["target"] == t)
            pts = [(x, y * scale) for x, y in pts if y is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=t, color=COLORS.get(t))
        if metric == "latency_p99_us":
            ax.axhline(50, color="red", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("messages sent per second (all senders)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)


def plot_generic(report, ax_list):
    rows = ok_rows(report)
    ax = ax_list[0]
    keys = sorted({k for r in rows for k in r["median"] if k.endswith("_per_s") or k.endswith("_mib_s")})[:1]
    for key in keys:
        ax.bar(range(len(rows)), [r["median"].get(key, 0) for r in rows],
               color=[COLORS.get(r["target"], "#333") for r in rows])
        ax.set_xticks(range(len(rows)), [r["target"] + "\n" + " ".join(r["config"].values()) for r in rows], fontsize=7)
        ax.set_title(key)


PLOTS = {
    "polling": (plot_polling, 2),
    "fanout": (plot_fanout, 3),
    "upload": (plot_upload, 2),
    "chat": (plot_chat, 2),
    "latency": (plot_latency, 1),
}


def main():
    results = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results"
    out = HERE / "plots"
    out.mkdir(exist_ok=True)
    for path in sorted(results.glob("*.json")):
        report = json.loads(path.read_text())
        fn, n = PLOTS.get(report["scenario"], (plot_generic, 1))
        fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 5))
        axes = list(axes) if n > 1 else [axes]
        fn(report, axes)
        fig.suptitle(f"{report['scenario']} — {report['machine']['nproc']} cores, {report['started_at']}", fontsize=10)
        fig.tight_layout()
        target = out / f"{report['scenario']}.png"
        fig.savefig(target, dpi=110)
        plt.close(fig)
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
