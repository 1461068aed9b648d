"""`tttkd`: training, adaptation and benchmarks on a feature cache."""

from __future__ import annotations

import typer

from .adapt import adapt
from .bench import app as bench_app
from .demo import demo
from .options import SingleValueGroup
from .train import evaluate, train

app = typer.Typer(help="TTT-KD: train, adapt and benchmark 3D segmentation from a feature cache.",
                  no_args_is_help=True, add_completion=False, cls=SingleValueGroup)
app.add_typer(bench_app, name="bench", cls=SingleValueGroup)
app.command()(demo)
app.command()(train)
app.command("eval")(evaluate)
app.command()(adapt)


if __name__ == "__main__":  # torchrun --nproc-per-node N -m tttkd.cli.main train ...
    app()
