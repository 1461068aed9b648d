"""`tttkd demo`: the whole product on the embedded data, on CPU, in minutes.

synth domains a and b -> feature caches (EfficientNet-Lite0 teacher) -> joint training on a's
train split -> evaluation on a's val split and on domain b (the shift later issues adapt to).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .options import fail

console = Console()


def demo(
    out: Annotated[Path, typer.Option(help="folder for the generated data, caches and runs")] = Path("demo"),
    scenes: Annotated[int, typer.Option(help="rooms of domain a (a quarter are its val split); b gets half as many")] = 8,
    views: Annotated[int, typer.Option(help="views per room")] = 8,
    epochs: Annotated[int, typer.Option(help="training epochs")] = 15,
    workers: Annotated[int, typer.Option(help="Dask workers and data-loading workers")] = 2,
    seed: Annotated[int, typer.Option(help="random seed of the embedded data")] = 0,
):
    """Embedded domains a and b -> caches -> train on a (small model, CPU) -> mIoU on a and b."""
    from tttkd.data import DataConfig
    from tttkd.evaluate import evaluate
    from tttkd.checkpoint import load_checkpoint, model_from_checkpoint
    from tttkd.pipeline.cache import FeatureCache
    from tttkd.pipeline.extract import PrepConfig
    from tttkd.pipeline.job import run_extraction
    from tttkd.pipeline.synth import generate
    from tttkd.train import TrainConfig, train

    from .prep import _print_info

    caches = {}
    for domain, count in (("a", scenes), ("b", max(1, scenes // 2))):
        root = out / "data" / f"synth_{domain}"
        if not (root / "scannetv2_train.txt").exists():
            console.print(f"[bold]synth[/bold] domain {domain}: {count} rooms -> {root}")
            generate(root, domain=domain, scenes=count, seed=seed, views=views)
        store = caches[domain] = out / "zarr" / f"synth_{domain}"
        console.print(f"[bold]extract[/bold] {root} -> {store}")
        config = PrepConfig(dataset="scannet", root=root, teacher="efficientnet_lite0", batch_size=8)
        for split in ("train", "val"):
            try:
                report = run_extraction(config, out=store, split=split, workers=workers, device="cpu")
            except (OSError, ValueError) as e:
                fail(str(e))
            if report.failed:
                fail(f"{len(report.failed)} scenes failed: {report.failed}")
        _print_info(store)

    run = out / "runs" / "synth_a"
    # a CPU-sized run: the small backbone, 6 cm voxels, BN statistics that settle within few steps
    config = TrainConfig(epochs=epochs, batch_size=2, model="small", bn_momentum=0.1, workers=workers,
                         data=DataConfig(voxel_size_m=0.06))
    if not (run / "last.pt").exists() or load_checkpoint(run / "last.pt")["epoch"] + 1 < epochs:
        console.print(f"[bold]train[/bold] {caches['a']} (train split) -> {run}")
        train(caches["a"], run, config, device="cpu", resume=True)

    checkpoint = load_checkpoint(run / "last.pt")
    model = model_from_checkpoint(checkpoint, device="cpu")
    table = Table(title="demo: trained on domain a (embedded), small model, CPU")
    for column in ("evaluated on", "scenes", "mIoU"):
        table.add_column(column)
    results = {}
    for name, store, split in (("domain a, val split", caches["a"], "val"), ("domain b (shifted)", caches["b"], None)):
        ids = FeatureCache(store).scene_ids(split=split)
        result = evaluate(model, store, ids, data_config=config.data, class_names=checkpoint["class_names"], device="cpu")
        results[name] = result.to_json()
        table.add_row(name, str(len(ids)), f"{result.miou:.3f}")
    console.print(table)
    (out / "demo-result.json").write_text(json.dumps(results, indent=1))
    console.print(f"wrote {out / 'demo-result.json'}, {run / 'curves.png'}")
