"""The embedded domain-shift experiment end to end, used by `tttkd demo` and `tttkd bench accuracy`:

    synth domains a and b -> feature caches (EfficientNet-Lite0, the offline teacher)
    -> Joint-Train and Source-Only models on each domain's train split
    -> every adaptation method on the other domain's val split (a -> b and b -> a),
       plus the controls: TTT-KD with shuffled teacher targets (must not help) and TTT-KD on
       in-distribution scenes (must not hurt)
    -> one results table per direction.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from tttkd.pipeline.cache import FeatureCache
from tttkd.pipeline.extract import PrepConfig
from tttkd.pipeline.job import run_extraction
from tttkd.pipeline.synth import generate

from .adapt import AdaptConfig
from .data import DataConfig
from .experiment import MethodResult, run_method, scored_classes, write_results
from .train import TrainConfig, train


@dataclass(frozen=True)
class ShiftConfig:
    scenes: int = 16
    """Rooms per domain; a quarter are its val split."""
    views: int = 8
    seed: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=20, batch_size=2, model="small", bn_momentum=0.1, data=DataConfig(voxel_size_m=0.06)))
    adapt: AdaptConfig = field(default_factory=lambda: AdaptConfig(steps=20, lr=0.1, rotations=2, kd_points=4096))
    directions: tuple[tuple[str, str], ...] = (("a", "b"), ("b", "a"))
    methods: tuple[str, ...] = ("none", "tent", "dua", "adacontrast", "ttt-kd-o", "ttt-kd")
    controls: bool = True
    oracle: bool = True
    """Train on the target too, for the Oracle row (the demo skips it to save CPU time)."""
    workers: int = 2


def generate_once(root: Path, domain: str, *, scenes: int, views: int, seed: int, val_fraction: float = 0.25) -> Path:
    """Generate one embedded domain unless it is complete (the split lists are written last)."""
    if not (root / "scannetv2_val.txt").exists():
        generate(root, domain=domain, scenes=scenes, seed=seed, views=views, val_fraction=val_fraction)
    return root


def extract_once(root: Path, store: Path, *, workers: int, device: str = "cpu", teacher: str = "efficientnet_lite0",
                 max_views: int | None = None, progress: bool = False, dataset: str = "scannet",
                 splits: tuple[str, ...] = ("train", "val")) -> Path:
    """Extract (resuming) `splits` of an embedded dataset (rooms: scannet layout; streets:
    semantickitti); return the store."""
    config = PrepConfig(dataset=dataset, root=root, teacher=teacher, batch_size=8, max_views=max_views)
    for split in splits:
        report = run_extraction(config, out=store, split=split, workers=workers, device=device, progress=progress)
        if report.failed:
            raise RuntimeError(f"{store}: {len(report.failed)} scenes failed: {report.failed}")
    return store


def prepare_domain(out: Path, domain: str, *, scenes: int, views: int, seed: int, workers: int) -> Path:
    """Generate (once) and extract (resuming) one embedded domain; return its cache."""
    root = generate_once(out / "data" / f"synth_{domain}", domain, scenes=scenes, views=views, seed=seed)
    return extract_once(root, out / "zarr" / f"synth_{domain}", workers=workers)


def train_once(cache: Path, run: Path, config: TrainConfig, device, *, progress: bool = False) -> Path:
    """Train (or finish training) a run; return its last checkpoint."""
    from .checkpoint import load_checkpoint

    done = (run / "last.pt").exists() and load_checkpoint(run / "last.pt")["epoch"] + 1 >= config.epochs
    if not done:
        train(cache, run, config, device=device, resume=True, progress=progress)
    return run / "last.pt"


def run_shift(out: Path, config: ShiftConfig, *, device, log=print) -> dict[str, str]:
    """The whole experiment; returns the Markdown table of each direction (also written under out/)."""
    caches = {d: prepare_domain(out, d, scenes=config.scenes, views=config.views, seed=config.seed,
                                workers=config.workers) for d in ("a", "b")}
    train_config = replace(config.train, workers=config.workers)
    models = {}
    trained = {s for s, _ in config.directions} | ({t for _, t in config.directions} if config.oracle else set())
    for domain in sorted(trained):
        log(f"train on {domain}: Joint-Train and Source-Only")
        models[domain] = {
            "joint": train_once(caches[domain], out / "runs" / f"synth_{domain}", train_config, device),
            "source_only": train_once(caches[domain], out / "runs" / f"synth_{domain}-source-only",
                                      replace(train_config, use_kd=False), device),
        }
    tables = {}
    for source, target in config.directions:
        log(f"adapt {source} -> {target}")
        cache = caches[target]
        ids = FeatureCache(cache).scene_ids(split="val")
        # one class list for the whole table, the Oracle and the controls included
        classes = scored_classes(FeatureCache(caches[source]).provenance["dataset"],
                                 FeatureCache(cache).provenance["dataset"])
        plan = [("Oracle", "none", models[target]["joint"])] if config.oracle else []
        plan += [("Source-Only", "none", models[source]["source_only"]), ("Joint-Train", "none", models[source]["joint"])]
        plan += [(row, m, models[source]["source_only"]) for row, m in
                 (("TENT", "tent"), ("DUA", "dua"), ("AdaContrast", "adacontrast")) if m in config.methods]
        plan += [(row, m, models[source]["joint"]) for row, m in (("TTT-KD-O", "ttt-kd-o"), ("TTT-KD", "ttt-kd"))
                 if m in config.methods]
        results: list[MethodResult] = [run_method(row, m, ckpt, cache, ids, config=config.adapt, device=device,
                                                  classes=classes) for row, m, ckpt in plan]
        if config.controls:
            results.append(run_method("control: TTT-KD, shuffled targets", "ttt-kd-shuffled", models[source]["joint"],
                                      cache, ids, config=config.adapt, device=device, classes=classes))
            own = FeatureCache(caches[source]).scene_ids(split="val")
            results.append(run_method(f"control: in-distribution ({source} val), Joint-Train", "none",
                                      models[source]["joint"], caches[source], own, config=config.adapt, device=device,
                                      classes=classes))
            results.append(run_method(f"control: in-distribution ({source} val), TTT-KD", "ttt-kd",
                                      models[source]["joint"], caches[source], own, config=config.adapt, device=device,
                                      classes=classes))
        tables[f"{source}->{target}"] = write_results(
            results, out / "results" / f"synth_{source}-to-synth_{target}",
            title=f"embedded domain {source} -> {target} ({len(ids)} val scenes)", classes=classes, config=config.adapt,
            setup={"scenes_per_domain": config.scenes, "views": config.views, "train": str(config.train)})
    return tables
