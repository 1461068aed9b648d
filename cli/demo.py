"""`tttkd demo`: the whole product on the embedded data, on CPU, in minutes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .options import fail

console = Console()


def demo(
    out: Annotated[Path, typer.Option(help="folder for the generated data and caches")] = Path("demo"),
    scenes: Annotated[int, typer.Option(help="rooms per domain")] = 6,
    views: Annotated[int, typer.Option(help="views per room")] = 8,
    workers: Annotated[int, typer.Option(help="Dask worker processes")] = 2,
    seed: Annotated[int, typer.Option(help="random seed of the embedded data")] = 0,
):
    """Embedded domains a and b -> feature caches with the EfficientNet-Lite0 teacher (CPU)."""
    from tttkd.pipeline.extract import PrepConfig
    from tttkd.pipeline.job import run_extraction
    from tttkd.pipeline.synth import generate

    from .prep import _print_info

    for domain in ("a", "b"):
        root = out / "data" / f"synth_{domain}"
        if not (root / "scannetv2_train.txt").exists():
            console.print(f"[bold]synth[/bold] domain {domain}: {scenes} rooms -> {root}")
            generate(root, domain=domain, scenes=scenes, seed=seed, views=views)
        store = out / "zarr" / f"synth_{domain}"
        console.print(f"[bold]extract[/bold] {root} -> {store}")
        config = PrepConfig(dataset="scannet", root=root, teacher="efficientnet_lite0", batch_size=8)
        ids = [line for line in (root / "scannetv2_train.txt").read_text().split() + (root / "scannetv2_val.txt").read_text().split()]
        try:
            report = run_extraction(config, out=store, scene_ids=ids, workers=workers, device="cpu")
        except (OSError, ValueError) as e:
            fail(str(e))
        if report.failed:
            fail(f"{len(report.failed)} scenes failed: {report.failed}")
        _print_info(store)
