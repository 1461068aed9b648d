"""Ablations across suite runs (paper Fig. 4b and the teacher comparison): one suite `--out` per
value of the ablated setting (views per scene in the cache, `--max-views K`; the teacher,
`--teacher NAME`), read back from each run's results.json and put side by side.

    tttkd bench ablation --runs suite-v5,suite-v10,suite-all --out ablation-views

Runs must differ in exactly one of the settings below and agree on everything else in their
protocol, or their numbers would not isolate it. The table and plots take each row's mean ± std
over the seeds of each run (the suite's per-seed cells)."""

from __future__ import annotations

import json
from pathlib import Path

from .suite import after_steps, mean_std_text

SETTINGS = {"max_views": "views per scene in the cache", "teacher": "teacher"}
"""Protocol fields an ablation may vary, and how the table names them."""


def load_run(path: Path) -> dict:
    """A suite run's results.json (under `path`, or `path` itself)."""
    path = Path(path)
    file = path if path.suffix == ".json" else path / "results.json"
    try:
        record = json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{file}: no results.json here; run `tttkd bench accuracy --suite ... --out {path}` first")
    except ValueError as e:
        raise ValueError(f"{file}: not readable JSON ({e})")
    if not isinstance(record, dict) or "protocol" not in record or "table" not in record:
        raise ValueError(f"{file}: not a suite's results.json (no protocol or table)")
    return record


def varied_setting(runs: list[dict], names: list[str]) -> str:
    """The one protocol field the runs differ in; an error naming what differs otherwise."""
    if len(runs) < 2:
        raise ValueError("an ablation needs at least two runs")
    differing = sorted({key for run in runs[1:] for key in set(run["protocol"]) | set(runs[0]["protocol"])
                        if run["protocol"].get(key) != runs[0]["protocol"].get(key)})
    if len(differing) != 1 or differing[0] not in SETTINGS:
        raise ValueError(f"runs {', '.join(names)} differ in {', '.join(differing) or 'nothing'}; an ablation varies "
                         f"exactly one of {', '.join(SETTINGS)} and keeps the rest of the protocol")
    return differing[0]


def _order(value):
    """Numeric settings in increasing order, None ("all views") last, names alphabetically."""
    return (value is None, value if isinstance(value, (int, float)) else 0, str(value))


def ablation_table(runs: list[dict], names: list[str], *, rows: tuple[str, ...], steps: tuple[int, ...] = ()) -> dict:
    """{"setting", "values", "families", "cells": {row: {family: [entry or None per value]}}}.

    `steps`: also each adapting row after that many TTT steps ("TTT-KD after 10 steps"), where its
    runs scored it then (TTT-KD peaks early at the paper's lr: the final step alone hides that)."""
    setting = varied_setting(runs, names)
    order = sorted(range(len(runs)), key=lambda i: _order(runs[i]["protocol"][setting]))
    runs = [runs[i] for i in order]
    families = [f for f in dict.fromkeys(f for run in runs for row in rows for f in run["table"].get(row, {}))]
    cells = {row: {f: [run["table"].get(row, {}).get(f) for run in runs] for f in families} for row in rows}
    for step in steps:
        for row in rows:
            curve = {f: [after_steps(run["table"].get(row, {}).get(f), step) for run in runs] for f in families}
            if any(any(entries) for entries in curve.values()):
                cells[f"{row} after {step} steps"] = curve
    return {"setting": setting, "values": [run["protocol"][setting] for run in runs], "families": families,
            "views": runs[0]["protocol"].get("views"),
            "runs": [names[i] for i in order], "cells": cells}


def label(value, table: dict) -> str:
    """A value's column name; "all (8)" for no --max-views, with the views the suite renders."""
    if value is None:
        return f"all ({table['views']})" if table.get("views") else "all"
    return str(value)


def markdown(table: dict) -> str:
    """Per family, rows x values of the setting, "mean ± std (n seeds)"."""
    lines = []
    for family in table["families"]:
        lines += [f"### {family}: mIoU (%) against the {SETTINGS[table['setting']]}", "",
                  "| row | " + " | ".join(label(v, table) for v in table["values"]) + " |",
                  "|---|" + "---:|" * len(table["values"])]
        for row, by_family in table["cells"].items():
            entries = by_family.get(family, [])
            if not any(entries):
                continue
            text = ["-" if e is None else f"{mean_std_text(e)} (n={e['n']})" for e in entries]
            lines.append(f"| {row} | " + " | ".join(text) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(table: dict, family: str, path: Path) -> bool:
    """mIoU against the setting for one family, a line with ± std error bars per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .suite import STYLE

    xs = list(range(len(table["values"])))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for row, by_family in table["cells"].items():
        entries = by_family.get(family, [])
        points = [(x, e["mean"], e["std"]) for x, e in zip(xs, entries) if e is not None]
        if not points:
            continue
        base = row.split(" after ")[0]  # "TTT-KD after 10 steps": TTT-KD's colour, dashed
        colour, marker = STYLE.get(base, ("black", "o"))
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], color=colour,
                    marker=marker, capsize=3, linewidth=2, label=row, linestyle="--" if base != row else "-")
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xticks(xs, [label(v, table) for v in table["values"]])
    ax.set_xlabel(SETTINGS[table["setting"]])
    ax.set_ylabel("mIoU (%)")
    ax.set_title(f"shift family: {family}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_ablation(run_dirs: list[Path], out: Path, *, rows: tuple[str, ...] = ("Joint-Train", "TTT-KD"),
                   steps: tuple[int, ...] = ()) -> dict:
    """ablation.md, ablation.json and ablation_<family>.png under `out`, from the runs' results."""
    names = [str(p) for p in run_dirs]
    table = ablation_table([load_run(p) for p in run_dirs], names, rows=rows, steps=steps)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(markdown(table))
    table["plots"] = [f"ablation_{f}.png" for f in table["families"] if plot(table, f, out / f"ablation_{f}.png")]
    (out / "ablation.json").write_text(json.dumps(table, indent=1))
    return table
