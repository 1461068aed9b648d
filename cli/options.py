"""Options shared by several commands, defined once (typer `Annotated` aliases)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

CacheOpt = Annotated[Path, typer.Option("--cache", help="feature cache (Zarr store) written by tttkd-prep extract")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="torch device (cuda, cuda:1, cpu); default: CUDA when available")]
TeacherOpt = Annotated[str, typer.Option("--model", help="teacher: dinov2_vit{s,b,l,g}14[_reg] or efficientnet_lite{0,1,2}")]
WeightsOpt = Annotated[Optional[Path], typer.Option(help="teacher weights file (default: torch.hub cache / weights package)")]
ScaleOpt = Annotated[float, typer.Option(help="image scale fed to the teacher (paper: 0.25)")]


def fail(message: str) -> None:
    """Print one error line and exit with code 1 (the only place errors become exit codes)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)
