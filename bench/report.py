"""Turning samples into ratios, a table, a chart and a JSON document."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchlib import Samples


def ratio(system: Samples, reference: Samples) -> float | None:
    """Relative speed against the reference (1.0 = as fast, higher = faster),
    from the medians of both."""
    a, b = system.median, reference.median
    if not system.values or not reference.values or not a or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b if system.higher_is_better else b / a


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def _fmt_abs(x: float, unit: str) -> str:
    if math.isnan(x):
        return "-"
    if unit == "s":
        return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"
    if unit == "IOPS":
        return f"{x:,.0f}"
    return f"{x:,.0f}"


def local_table(doc: dict) -> str:
    """Markdown table: one row per case, one column per system; cells are
    relative speed against native ext4 (native's own cell: absolute median)."""
    local = doc["local"]
    systems = doc["local_systems"]
    names = list(systems)
    header = ["case"] + [systems[n]["label"] for n in names]
    rows = [header, ["---"] * len(header)]
    for key, case in local.items():
        row = [f"{case['label']}"]
        for n in names:
            cell = case["systems"].get(n, {})
            if not systems[n]["available"]:
                row.append("n/a")
            elif n == doc["reference"]:
                row.append(f"1.00 ({_fmt_abs(cell.get('median', float('nan')), case['unit'])})")
            else:
                row.append(_fmt(cell.get("ratio")))
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def lazy_table(doc: dict) -> str:
    lazy = doc.get("lazy") or {}
    lines = []
    for link, body in lazy.items():
        if body.get("unavailable"):
            lines.append(f"{link}: unavailable: {body['unavailable']}")
            continue
        approaches = body["approaches"]
        names = list(approaches)
        lines.append(f"\n{link}, image {body['image_bytes'] / (1 << 20):.0f} MiB "
                     f"(time as a fraction of download-then-run; lower is better; "
                     f"[bytes on the wire / bytes read])\n")
        header = ["case"] + [approaches[n]["label"] for n in names]
        rows = [header, ["---"] * len(header)]
        for key, case in body["cases"].items():
            row = [case["label"]]
            for n in names:
                if approaches[n].get("unavailable"):
                    row.append("n/a")
                    continue
                cell = case["approaches"].get(n)
                if not cell or not cell.get("values"):
                    row.append("-")
                    continue
                text = f"{_fmt(cell.get('vs_download'))} ({_fmt_abs(cell['median'], 's')})"
                if cell.get("timeouts"):
                    text = f">{text}"
                if cell.get("amplification") is not None:
                    text += f" [{cell['amplification']:.2f}x]"
                row.append(text)
            rows.append(row)
        lines.append("\n".join("| " + " | ".join(r) + " |" for r in rows))
        for n in names:
            if approaches[n].get("unavailable"):
                lines.append(f"\n{approaches[n]['label']}: unavailable: {approaches[n]['unavailable']}")
    return "\n".join(lines)


def targets_table(doc: dict) -> str:
    rows = [["DESIGN.md target", "measured", "verdict"], ["---", "---", "---"]]
    for t in doc.get("targets", []):
        rows.append([t["target"], t["measured"], t["verdict"]])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def write_json(doc: dict, path: Path) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(o):
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON: {type(o)}")


def chart(doc: dict, path: Path) -> None:
    """One PNG: local relative speeds (grouped bars, native = 1) on top, lazy
    times relative to download-then-run below."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    local = doc["local"]
    systems = {n: s for n, s in doc["local_systems"].items()
               if s["available"] and n != doc["reference"]}
    lazy = {k: v for k, v in (doc.get("lazy") or {}).items() if not v.get("unavailable")}
    nrows = 1 + len(lazy)
    fig, axes = plt.subplots(nrows, 1, figsize=(14, 5 + 3.6 * len(lazy)), squeeze=False,
                             gridspec_kw={"height_ratios": [1.6] + [1] * len(lazy)})
    ax = axes[0][0]
    cases = list(local)
    width = 0.8 / max(1, len(systems))
    for i, (name, s) in enumerate(systems.items()):
        vals = [local[c]["systems"].get(name, {}).get("ratio") or 0 for c in cases]
        xs = [k + (i - (len(systems) - 1) / 2) * width for k in range(len(cases))]
        ax.bar(xs, vals, width, label=s["label"])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(0.9, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([local[c]["label"] for c in cases], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("speed relative to native ext4 (log)")
    ax.set_yscale("log")
    ax.set_title(f"Local, data complete ({doc['meta']['mode']} run, medians of "
                 f"{doc['meta']['params']['reps']}; dashed = 0.9)")
    if systems:
        ax.legend(fontsize=8, ncol=3)
    ax.grid(axis="y", alpha=0.3, which="both")

    for row, (link, body) in enumerate(lazy.items(), start=1):
        ax = axes[row][0]
        approaches = {n: a for n, a in body["approaches"].items() if not a.get("unavailable")}
        lcases = list(body["cases"])
        width = 0.8 / max(1, len(approaches))
        for i, (name, a) in enumerate(approaches.items()):
            vals = [(body["cases"][c]["approaches"].get(name) or {}).get("vs_download") or 0
                    for c in lcases]
            xs = [k + (i - (len(approaches) - 1) / 2) * width for k in range(len(lcases))]
            ax.bar(xs, vals, width, label=a["label"])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(0.25, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(lcases)))
        ax.set_xticklabels([body["cases"][c]["label"] for c in lcases], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("time / download-then-run (log)")
        ax.set_title(f"Lazy over {link}, image {body['image_bytes'] / (1 << 20):.0f} MiB "
                     "(lower is better; dashed = 0.25)")
        if approaches:
            ax.legend(fontsize=8, ncol=4)
        ax.grid(axis="y", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(doc: dict) -> str:
    """The run's tables as Markdown (written beside the JSON as <mode>.md)."""
    m = doc["meta"]
    parts = [f"Run: `{m['command']}` ({m['mode']}, {m['started']}, {m.get('duration_s', 0):.0f} s; "
             f"local repetitions {m['params']['reps']}, lazy repetitions {m['params']['lazy_reps']})"]
    if doc.get("local"):
        parts += ["", "Local, data complete: speed relative to native ext4 (higher is better; "
                  "native column: absolute median)", "", local_table(doc)]
        for s in doc["local_systems"].values():
            if not s["available"]:
                parts.append(f"\n{s['label']}: unavailable: {s.get('unavailable')}")
            elif s.get("failures"):
                parts.append(f"\n{s['label']}: failed repetitions: {'; '.join(s['failures'])}")
    if doc.get("lazy"):
        parts += ["", lazy_table(doc).strip()]
    if doc.get("targets"):
        parts += ["", targets_table(doc)]
    return "\n".join(parts) + "\n"
