"""`tttkd demo`: the whole product on the embedded data, on CPU, in minutes.

synth domain a and its shifted twin (default: every shift family at once) -> feature caches
(EfficientNet-Lite0 teacher) -> Joint-Train and Source-Only models on a (small backbone) -> every
adaptation method on the shifted rooms -> a short table (mIoU and change against Source-Only), the
per-class tables and the mIoU-vs-steps plot. It is the `cpu` preset of `tttkd bench accuracy
--suite`, one family and one seed.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .options import fail

console = Console()
DEMO_ROWS = ("Source-Only", "Joint-Train", "TENT", "DUA", "AdaContrast", "TTT-KD-O", "TTT-KD")


def short_table(miou: dict[str, float]) -> str:
    """Rows `method  mIoU  change against Source-Only`, in mIoU points; at most 100 columns."""
    base = miou.get("Source-Only")
    width = max(len(row) for row in miou)
    lines = [f"{'method':<{width}}  {'mIoU':>6}  {'vs Source-Only':>14}"]
    for row, value in miou.items():
        change = "" if base is None or row == "Source-Only" else f"{100 * (value - base):+.1f}"
        lines.append(f"{row:<{width}}  {100 * value:6.1f}  {change:>14}")
    return "\n".join(lines)


def verdict(miou: dict[str, float], *, family: str, scenes: int) -> str:
    """One line on what the numbers show, from the numbers."""
    base = miou["Source-Only"]
    best = max((row for row in miou if row != "Source-Only"), key=miou.get)
    ttt = miou.get("TTT-KD")
    head = (f"Under the '{family}' shift, TTT-KD changes mIoU by {100 * (ttt - base):+.1f} points against Source-Only"
            if ttt is not None else f"Under the '{family}' shift")
    return (f"{head}; the best row is {best} ({100 * (miou[best] - base):+.1f}). One seed and {scenes} target "
            f"scenes: differences of a few points are noise (the suite gives mean ± std over seeds).")


def demo(
    out: Annotated[Path, typer.Option(help="folder for the generated data, caches, runs and results")] = Path("demo"),
    family: Annotated[str, typer.Option(help="shift family: appearance, sensor, geometry or all")] = "all",
    scenes: Annotated[int, typer.Option(help="rooms per domain (a quarter are the target scenes)")] = 8,
    epochs: Annotated[int, typer.Option(help="training epochs")] = 8,
    steps: Annotated[int, typer.Option(help="TTT steps per scene and rotation")] = 10,
    workers: Annotated[int, typer.Option(help="Dask workers and data-loading workers")] = 2,
    seed: Annotated[int, typer.Option(help="random seed of the data, the training and the adaptation")] = 0,
):
    """Embedded a -> shifted a on CPU: caches, training on a, TTT-KD and the baselines, a short table."""
    import json

    from tttkd.suite import cpu_suite, load_cells, run_suite

    config = cpu_suite()
    config = replace(config, scenes=scenes, families=(family,), seeds=(seed,), rows=DEMO_ROWS, workers=workers,
                     train=replace(config.train, epochs=epochs), adapt=replace(config.adapt, steps=steps))
    results = out / "results"
    try:
        run_suite(config, results, work=out, device="cpu", log=lambda m: console.print(f"[bold]{m}[/bold]"),
                  bars=True)
    except (OSError, ValueError, RuntimeError) as e:
        fail(str(e))
    cells = {c["row"]: c for c in load_cells(results) if c["family"] == family and c["seed"] == seed}
    miou = {row: cells[row]["result"]["miou"] for row in DEMO_ROWS if row in cells}
    target_scenes = len(next(iter(cells.values()))["target_scenes"])
    console.print()
    console.print(f"mIoU (%) on {target_scenes} shifted rooms, over the classes present:")
    console.print(short_table(miou), highlight=False)
    console.print(verdict(miou, family=family, scenes=target_scenes))
    console.print(f"Per-class tables: {results / 'results.md'}; plot: {results / f'miou_vs_steps_{family}.png'}; "
                  f"per-run JSON: {results / 'cells'}")
    (results / "demo.json").write_text(json.dumps({"family": family, "seed": seed, "miou": miou}, indent=1))
