"""`tttkd demo`: the whole product on the embedded data, on CPU, in minutes.

synth domains a and b -> feature caches (EfficientNet-Lite0 teacher) -> Joint-Train and
Source-Only models on a (small backbone) -> every adaptation method on b -> the results table.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .options import fail

console = Console()


def demo(
    out: Annotated[Path, typer.Option(help="folder for the generated data, caches, runs and results")] = Path("demo"),
    scenes: Annotated[int, typer.Option(help="rooms per domain (a quarter are the val split)")] = 8,
    epochs: Annotated[int, typer.Option(help="training epochs")] = 15,
    steps: Annotated[int, typer.Option(help="TTT steps per scene and rotation")] = 10,
    workers: Annotated[int, typer.Option(help="Dask workers and data-loading workers")] = 2,
    seed: Annotated[int, typer.Option(help="random seed of the embedded data")] = 0,
):
    """Embedded a -> b on CPU: caches, training on a, TTT-KD and the baselines on b, results table."""
    from tttkd.shift import ShiftConfig, run_shift

    config = ShiftConfig(scenes=scenes, seed=seed, workers=workers, directions=(("a", "b"),), controls=False,
                         oracle=False)
    config = replace(config, train=replace(config.train, epochs=epochs), adapt=replace(config.adapt, steps=steps))
    try:
        tables = run_shift(out, config, device="cpu", log=lambda m: console.print(f"[bold]{m}[/bold]"))
    except (OSError, ValueError, RuntimeError) as e:
        fail(str(e))
    for table in tables.values():
        console.print(table)
    console.print(f"results.md, results.json and miou_vs_steps.png under {out / 'results'}; checkpoints under {out / 'runs'}")
