#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Draws make bench's chart from the bench.json that tools/bench-guest.py
wrote: per job, each column's rate relative to the baseline (the raw file;
cp for the merges; with several rounds, the median of the rounds' paired
ratios, as the table prints), and below it each column's guest CPU (per
I/O for the fio jobs, in all for the timed ones) relative to the
baseline's. Log scales; 1 is the baseline.

usage: bench-chart.py BENCH.JSON OUT.svg|OUT.png

Needs matplotlib (Debian: python3-matplotlib; make bench-deps).
"""

import json
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLUMNS = ("dm-qcow2", "loop", "qemu-nbd", "rublk")
COLORS = {"dm-qcow2": "tab:blue", "loop": "tab:gray", "qemu-nbd": "tab:orange",
          "rublk": "tab:green"}


def rate(r):
    if not r or r.get("error"):
        return None
    return r["iops"] if r.get("iops") is not None else r.get("mbps")


def cpu(r):
    """CPU per I/O (fio jobs) or CPU seconds (timed jobs)."""
    if not r or r.get("error") or r.get("cpu_s") is None:
        return None
    return r["cpu_s"] / r["ios"] if r.get("ios") else r["cpu_s"]


def baseline(res):
    """The column the job compares with: raw, else cp (the merges), else
    alone (reads during a merge against reads without one)."""
    for name in ("raw", "cp", "alone"):
        if name in res:
            return name
    return None


def paired_rate_ratio(r, b):
    """With DMQ_BENCH_ROUNDS > 1: the median of R's rate over B's, round i
    against round i (what the bench's table prints), else None."""
    ra, rb = (r or {}).get("rounds"), (b or {}).get("rounds")
    if not ra or not rb or len(ra) != len(rb) or not all(ra) or not all(rb):
        return None
    return statistics.median(x / y for x, y in zip(ra, rb))


def ratios(jobs, metric):
    """{column: [metric over the baseline's, per job (None if missing)]}"""
    out = {c: [] for c in COLUMNS}
    for res in jobs.values():
        b = res.get(baseline(res))
        base = metric(b)
        for c in COLUMNS:
            r = res.get(c)
            v = metric(r)
            pr = paired_rate_ratio(r, b) if metric is rate and v and base else None
            out[c].append(pr if pr else v / base if v and base else None)
    return out


def bars(ax, labels, series, ylabel):
    present = [c for c in COLUMNS if any(v is not None for v in series[c])]
    width = 0.8 / max(1, len(present))
    for i, c in enumerate(present):
        pts = [(j + (i - (len(present) - 1) / 2) * width, v)
               for j, v in enumerate(series[c]) if v is not None]
        ax.bar([x for x, _ in pts], [v for _, v in pts], width, label=c, color=COLORS[c])
        for x, v in pts:
            ax.annotate(f"{v:.2g}", (x, v), ha="center", va="bottom", fontsize=6)
    ax.axhline(1, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    if present:
        ax.legend(fontsize=8)


def main():
    data = json.load(open(sys.argv[1]))
    jobs = data["jobs"]
    labels = [f"{name} (vs {baseline(res)})" if baseline(res) == "cp" else name
              for name, res in jobs.items()]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, len(labels) * 0.9), 9),
                                      sharex=True)
    bars(top, labels, ratios(jobs, rate), "rate / raw (higher is better)")
    bars(bottom, labels, ratios(jobs, cpu), "CPU per I/O (timed jobs: CPU) / raw\n(lower is better)")
    top.set_title(f"make bench: {data['fs']}, {data['size_mb']} MiB, cluster "
                  f"{data['cluster']}, {data['runtime']} s a run (TCG VM)")
    fig.tight_layout()
    fig.savefig(sys.argv[2])


if __name__ == "__main__":
    main()
