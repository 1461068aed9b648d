"""The embedded domain-shift suite: every method on every shift family and seed, each result cell
saved the moment it finishes, then one table (mean ± std over seeds) and mIoU-vs-steps plots.

    per seed s:    synth domain a (seed s) -> cache -> Joint-Train and Source-Only (training seed s)
    per family f:  synth family f on domain a's rooms (seed s, `synth.FAMILIES`) -> cache
                   -> every row on f's val scenes -> one cell   <out>/cells/<f>/seed<s>/<row>.json
    family "none": the in-distribution control, domain a's own val scenes (must not degrade)

The shifted val rooms are the source's val rooms with one group of parameters changed, so each
family's drop isolates that group. Rows (paper Tables 1-3): Oracle (trained on the family's train
rooms), Source-Only, Joint-Train, TENT, DUA, AdaContrast, TTT-KD-O, TTT-KD, and the control TTT-KD
with shuffled teacher targets (must not help).

The outdoor setting (`outdoor_suite`, paper Table 2 in miniature): one family, "lidar", the
embedded streets seen by a 16-beam LiDAR (source) and a 64-beam one (target) with the same camera;
xMUDA's SCN U-Net on xyz; the rows of Table 2 (Oracle, Source-Only, Joint-Train, TENT, xMUDA, MM-TTA,
TTT-KD-O, TTT-KD) and the shuffled-targets control on the target's test frames, with the paper's
own numbers printed beside ours.

Resumable: a cell is written atomically (temporary file, then rename) and a rerun skips every
finished cell of the same protocol; offline TTT-KD, whose scenes are independent, also saves each
scene, so a cell longer than one device call still advances. Data, caches and checkpoints live in a
separate work folder, under paths keyed by what they depend on (`Workspace`), and are rebuilt
deterministically when missing. `max_minutes` stops before a
unit of work that would not fit. `jobs` processes per device share the scenes of an offline
TTT-KD cell: one process leaves the GPU idle while Python prepares each step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from tttkd.pipeline import streets
from tttkd.pipeline.cache import FeatureCache
from tttkd.pipeline.manifests import paper_label, paper_results
from tttkd.pipeline.synth import DOMAINS, FAMILIES, FAMILY_FIELDS, generate

from .adapt import AdaptConfig
from .augment import OUTDOOR_AUGMENTATION
from .data import DataConfig
from .experiment import MULTIMODAL, MethodResult, markdown_table, run_method, scored_classes
from .metrics import iou_per_class, mean_iou
from .shift import extract_once, train_once
from .train import TrainConfig

IN_DISTRIBUTION = "none"
"""The pseudo-family of the in-distribution control: the source domain's own target-split scenes."""
SHUFFLED = "control: TTT-KD, shuffled targets"
# (row, method, model): model is the source's "joint" or "source_only", or the family's "oracle"
ROW_PLAN = (("Oracle", "none", "oracle"), ("Source-Only", "none", "source_only"), ("Joint-Train", "none", "joint"),
            ("TENT", "tent", "source_only"), ("DUA", "dua", "source_only"), ("AdaContrast", "adacontrast", "source_only"),
            ("xMUDA", "xmuda", "source_only"), ("MM-TTA", "mm-tta", "source_only"),
            ("TTT-KD-O", "ttt-kd-o", "joint"), ("TTT-KD", "ttt-kd", "joint"), (SHUFFLED, "ttt-kd-shuffled", "joint"))
ROWS = tuple(row for row, _, _ in ROW_PLAN)
INDOOR_ROWS = tuple(row for row in ROWS if row not in ("xMUDA", "MM-TTA"))  # paper Table 1 (+ the control)
OUTDOOR_ROWS = tuple(row for row in ROWS if row not in ("DUA", "AdaContrast"))  # paper Table 2 (+ the control)
IN_DISTRIBUTION_ROWS = ("Source-Only", "Joint-Train", "TTT-KD")
PER_SCENE = ("ttt-kd", "ttt-kd-shuffled")  # offline: scenes are independent, so each is saved on its own
# work order within a (seed, family): the cheap rows first, the Oracle (one more training) last
ORDER = ROWS[1:] + ROWS[:1]


@dataclass(frozen=True)
class Setting:
    """Where a suite's domains come from and how its cells read them."""

    name: str
    dataset: str
    """The dataset layout the generator writes and extraction reads."""
    source: str
    """The domain the source models (Joint-Train, Source-Only) train on."""
    domains: dict
    """family -> the generated domain whose scenes are its targets."""
    target_split: str
    """Split of the target scenes (the train split of a domain trains its models)."""
    paper: dict
    """row -> the paper's mIoU (%) of the experiment this setting miniaturises; {}: none comparable."""
    paper_label: str = ""


INDOOR = Setting("indoor", "scannet", "a", {**{f: f for f in FAMILIES}, IN_DISTRIBUTION: "a"}, "val", {})
OUTDOOR = Setting("outdoor", "semantickitti", "source", {"lidar": "target", IN_DISTRIBUTION: "source"}, "test",
                  paper_results("a2d2", "semantickitti"),
                  f"{paper_label('a2d2', 'semantickitti')}, Table 2: A2D2 → SemanticKITTI")
SETTINGS = {s.name: s for s in (INDOOR, OUTDOOR)}


def domain_record(setting: Setting, domain: str) -> tuple[dict, list[str]]:
    """(the generator's parameters of `domain`, the names of those its family changes)."""
    if setting.name == "outdoor":
        changed = ["lidar", "lidar_mount"] if domain == "target" else []
        return asdict(streets.DOMAINS[domain]), changed
    return asdict(DOMAINS[domain]), list(FAMILY_FIELDS.get(domain, ()))


@dataclass(frozen=True)
class SuiteConfig:
    name: str
    scenes: int
    """Rooms per domain; `val_fraction` of them are the target scenes."""
    val_fraction: float
    views: int
    """Views per room in the generated data."""
    train: TrainConfig
    adapt: AdaptConfig
    max_views: int | None = None
    """Views per scene in the cache (ablation, paper Fig. 4b); None: all."""
    teacher: str = "efficientnet_lite0"
    """The offline teacher: efficientnet_lite0/1/2 (ablation: the teacher)."""
    families: tuple[str, ...] = FAMILIES + (IN_DISTRIBUTION,)
    seeds: tuple[int, ...] = (0, 1, 2)
    """Each seed draws the data, the training and the adaptation samples."""
    rows: tuple[str, ...] = INDOOR_ROWS
    workers: int = 2
    setting: str = "indoor"
    """indoor (the shift families of `synth`) or outdoor (the streets of `streets`, two LiDARs)."""
    jobs: int = 1
    """Processes on the one device that share the scenes of an offline TTT-KD cell (no effect on results)."""
    scene_gpus: tuple[str, ...] = ()
    """GPUs (CUDA_VISIBLE_DEVICES ids) whose processes, `jobs` on each, share the scenes of an offline
    TTT-KD cell: suites of several families on one machine then balance their longest work over every
    GPU (no effect on results). Empty: this process's device."""

    def protocol(self) -> dict:
        """What a cell's number depends on: cells of another protocol are never mixed in."""
        record = asdict(self)
        for key in ("name", "families", "seeds", "rows", "workers", "jobs", "scene_gpus"):
            record.pop(key)
        for key in NO_EFFECT_ON_THE_MODEL:
            record["train"].pop(key, None)
        for key in NO_EFFECT_ON_ADAPTATION:
            record["adapt"].pop(key, None)
        return json.loads(json.dumps(record))

    @property
    def place(self) -> Setting:
        return SETTINGS[self.setting]


def cpu_suite() -> SuiteConfig:
    """A few minutes a family and seed on 2 CPU cores: the small backbone, few rooms and steps."""
    return SuiteConfig(
        name="cpu", scenes=8, val_fraction=0.25, views=4, seeds=(0,),
        train=TrainConfig(epochs=8, batch_size=2, model="small", bn_momentum=0.1, validate=False,
                          data=DataConfig(voxel_size_m=0.06)),
        adapt=AdaptConfig(steps=10, lr=1.0, rotations=2, kd_points=4096))


def gpu_suite() -> SuiteConfig:
    """The paper's protocol (appendix C.1): MinkUNet34C, TTT-KD at lr 1.0 for 100 steps, 8 rotations,
    16,384 KD points; 16 target and 16 training rooms per domain; 3 seeds."""
    return SuiteConfig(
        name="gpu", scenes=32, val_fraction=0.5, views=8, seeds=(0, 1, 2), workers=8,
        train=TrainConfig(epochs=40, batch_size=2, model="minkunet34c", bn_momentum=0.1, validate=False,
                          data=DataConfig(voxel_size_m=0.04)),
        adapt=AdaptConfig(steps=100, lr=1.0, rotations=8, kd_points=16384))


def outdoor_suite() -> SuiteConfig:
    """Paper Table 2 in miniature: 16-beam -> 64-beam streets (48 train, 16 val, 16 test frames a
    domain), xMUDA's SCN U-Net on xyz at 5 cm, the paper's outdoor TTT (lr 0.1, 25 steps, 4
    rotations, 16,384 KD points); 3 seeds."""
    return SuiteConfig(
        name="outdoor", setting="outdoor", scenes=80, val_fraction=0.2, views=1, families=("lidar", IN_DISTRIBUTION),
        rows=OUTDOOR_ROWS, seeds=(0, 1, 2), workers=8,
        train=TrainConfig(epochs=60, batch_size=4, model="scn_unet", bn_momentum=0.1, validate=False,
                          data=DataConfig(voxel_size_m=0.05, input_features="xyz", augment=OUTDOOR_AUGMENTATION)),
        adapt=AdaptConfig(steps=25, lr=0.1, rotations=4, kd_points=16384))


NO_EFFECT_ON_THE_MODEL = ("workers", "checkpoint_minutes", "ddp_batch_norm")
"""Training options that change no trained model of one process: left out of protocols, run folder
names and the check of a reused checkpoint."""
NO_EFFECT_ON_ADAPTATION = ("reuse_pairs", "cuda_graph")
"""How TTT-KD's step runs, not what it computes (equal results: tests on CPU and in the GPU lane):
left out of protocols."""

SUITES = {"cpu": cpu_suite, "gpu": gpu_suite, "outdoor": outdoor_suite}


def slug(row: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", row.lower()).strip("-")


def write_json_atomic(path: Path, record: dict) -> None:
    """Write to a temporary file, then rename: a reader never sees half a cell."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def read_cell(path: Path, protocol: dict) -> dict | None:
    """A finished cell, or None if there is none (a half-written file counts as none). A cell of
    another protocol is an error: mixing it into the table would be wrong."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or "result" not in record:
        return None
    if with_defaults(record.get("protocol")) != protocol:
        raise ValueError(f"{path}: made with another protocol (suite {record.get('suite')!r}); "
                         "use another --out for this one")
    return record


def with_defaults(protocol) -> dict | None:
    """A recorded protocol with the fields added since it was written at the values that kept the
    earlier behaviour (setting "indoor", fp32 TTT), so older cells stay readable."""
    if not isinstance(protocol, dict):
        return protocol
    protocol = json.loads(json.dumps(protocol))
    protocol.setdefault("setting", "indoor")
    if isinstance(protocol.get("adapt"), dict):
        protocol["adapt"].setdefault("tf32", False)
        for key in NO_EFFECT_ON_ADAPTATION:
            protocol["adapt"].pop(key, None)
    return protocol


_DIGESTS: dict[tuple, str] = {}


def model_digest(path: Path) -> str:
    """sha256 of a checkpoint (cached per path, size and mtime). GPU training is not bit-reproducible,
    so a model retrained on a fresh machine for the same seed is another instance: the digest in
    each cell shows which one it used."""
    from tttkd.pipeline.teacher import file_sha256

    stat = Path(path).stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_sha256(Path(path))
    return _DIGESTS[key]


def model_role(cell: dict) -> str:
    """Which trained model a cell's row uses: source_only, joint, or the family's oracle."""
    kind = next(k for r, _, k in ROW_PLAN if r == cell["row"])
    return f"oracle of {cell['family']}" if kind == "oracle" else kind


def mixed_instances(cells: list[dict]) -> list[str]:
    """One line per (seed, model role) whose cells used more than one trained instance (or an
    unrecorded one beside a recorded one): their differences include retraining noise."""
    seen: dict[tuple, set] = {}
    for cell in cells:
        digests = cell.get("parts_model_sha256") or [cell.get("model_sha256") or "unrecorded"]
        seen.setdefault((cell["seed"], model_role(cell)), set()).update(digests)
    return [f"seed {seed}, {role}: {len(digests)} trained instances" for (seed, role), digests in sorted(seen.items())
            if len(digests) > 1]


def environment() -> dict:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": device, "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


class Clock:
    """Stops before a unit of work that would end past `max_minutes`, judging by the longest unit
    of the same kind so far. With `record` (a JSON file), the longest units of earlier calls on the
    same device count too, so the first unit of a kind in a call is not started blind."""

    def __init__(self, max_minutes: float | None, record: Path | None = None, device: str = ""):
        self.deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
        self.record, self.device = record, device
        self.longest: dict[str, float] = {}
        if record is not None:
            try:
                self.longest = {k: float(v) for k, v in json.loads(Path(record).read_text()).get(device, {}).items()}
            except (OSError, ValueError, AttributeError, TypeError):
                self.longest = {}
            if max_minutes is not None:  # a unit longer than a whole call must still start first in one
                self.longest = {k: min(v, 0.9 * 60 * max_minutes) for k, v in self.longest.items()}

    def fits(self, kind: str) -> bool:
        return self.deadline is None or time.monotonic() + self.longest.get(kind, 0.0) < self.deadline

    def took(self, kind: str, seconds: float) -> None:
        self.longest[kind] = max(self.longest.get(kind, 0.0), seconds)
        if self.record is not None:
            try:
                known = json.loads(Path(self.record).read_text())
            except (OSError, ValueError):
                known = {}
            known = known if isinstance(known, dict) else {}
            mine = known.get(self.device) if isinstance(known.get(self.device), dict) else {}
            known[self.device] = mine | {k: max(v, float(mine.get(k, 0.0))) for k, v in self.longest.items()}
            try:
                write_json_atomic(Path(self.record), known)
            except OSError:  # a hint for later calls, never worth losing the work it times
                pass


class OutOfTime(Exception):
    pass


@dataclass
class SuiteRun:
    """The outcome of one call of `run_suite`."""

    done: int
    total: int
    stopped: bool
    ran: list[str] = field(default_factory=list)
    """Cells computed by this call (skipped ones not included)."""


class Workspace:
    """Data, caches and models of the suite, each made on first need (deterministically).

    Every path names what its content depends on, so configs that differ (teacher, max_views,
    rooms, views, val_fraction, training) never reuse each other's files in one work folder:

        data/s{scenes}-v{views}-f{val_fraction}/seed{s}/{domain}
        zarr/<data key>/{teacher}-mv{max_views}/seed{s}/{domain}
        runs/<data key>/<cache key>/train-{hash of the training config}/seed{s}/{domain}[-source-only]

    Before reuse the store's provenance and the checkpoint's training config are checked too (a
    file moved or made by hand is refused, not silently used)."""

    def __init__(self, config: SuiteConfig, work: Path, *, device: str, log, clock: Clock, bars: bool):
        self.config, self.work, self.device, self.log, self.clock, self.bars = config, work, device, log, clock, bars
        self.generated: set[int] = set()

    def data_key(self) -> str:
        if self.config.setting == "outdoor":
            return f"streets-s{self.config.scenes}"
        return f"s{self.config.scenes}-v{self.config.views}-f{self.config.val_fraction:g}"

    def cache_key(self) -> str:
        views = "all" if self.config.max_views is None else self.config.max_views
        return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', self.config.teacher)}-mv{views}"

    def train_key(self) -> str:
        """A short hash of the training config (seed and use_kd are per run, workers change no result)."""
        record = asdict(self.config.train)
        for key in ("seed", "use_kd", *NO_EFFECT_ON_THE_MODEL):
            record.pop(key)
        return "train-" + hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:10]

    def root(self, domain: str, seed: int) -> Path:
        return self.work / "data" / self.data_key() / f"seed{seed}" / domain

    def store(self, domain: str, seed: int) -> Path:
        return self.work / "zarr" / self.data_key() / self.cache_key() / f"seed{seed}" / domain

    def run_dir(self, domain: str, seed: int, kind: str) -> Path:
        name = domain if kind == "joint" else f"{domain}-source-only"
        return self.work / "runs" / self.data_key() / self.cache_key() / self.train_key() / f"seed{seed}" / name

    def train_config(self, seed: int, kind: str) -> TrainConfig:
        return replace(self.config.train, seed=seed, workers=self.config.workers, use_kd=kind == "joint")

    def _domains(self) -> list[str]:
        return list(dict.fromkeys([self.config.place.source] + [self.config.place.domains[f] for f in self.config.families]))

    def _generated(self, domain: str, seed: int) -> bool:
        marker = "generated.json" if self.config.setting == "outdoor" else "scannetv2_val.txt"  # written last
        return (self.root(domain, seed) / marker).exists()

    def _generate(self, seed: int) -> None:
        """Every domain of a seed at once, in spawned processes (which import only the generator)."""
        todo = [d for d in self._domains() if not self._generated(d, seed)]
        if not todo:
            return
        self.log(f"seed {seed}: generating {self.config.setting} scenes of {', '.join(todo)}")
        processes = max(1, self.config.workers)
        with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
            if self.config.setting == "outdoor":  # ~1.4 s a street: frames spread over the processes
                chunks = [(d, range(k, self.config.scenes, processes)) for d in todo for k in range(processes)]
                futures = [pool.submit(streets.generate, self.root(d, seed), domain=d, scenes=self.config.scenes,
                                       seed=seed, frames=frames) for d, frames in chunks]
            else:
                futures = [pool.submit(generate, self.root(d, seed), domain=d, scenes=self.config.scenes,
                                       views=self.config.views, seed=seed, val_fraction=self.config.val_fraction)
                           for d in todo]
            for future in futures:
                future.result()
        if self.config.setting == "outdoor":
            for d in todo:
                write_json_atomic(self.root(d, seed) / "generated.json",
                                  {"domain": d, "seed": seed, "scenes": self.config.scenes,
                                   "parameters": domain_record(self.config.place, d)[0]})

    def _expected_scenes(self) -> int:
        if self.config.setting == "outdoor":  # the train and test frames are extracted (val: not used)
            counts = streets.split_counts(self.config.scenes)
            return counts["train"] + counts["test"]
        return self.config.scenes

    def cache(self, domain: str, seed: int) -> Path:
        if seed not in self.generated:
            with exclusive(self.root(domain, seed).parent / "generate.lock"):
                self._generate(seed)
            self.generated.add(seed)
        store = self.store(domain, seed)
        with exclusive(store.parent / f"{store.name}.lock"):
            return self._cache(domain, seed, store)

    def _cache(self, domain: str, seed: int, store: Path) -> Path:
        if (store / "zarr.json").exists():
            provenance = FeatureCache(store).provenance
            found = {key: provenance.get(key) for key in ("teacher", "max_views")}
            wanted = {"teacher": self.config.teacher, "max_views": self.config.max_views}
            if found != wanted:
                raise ValueError(f"{store}: a cache of {found}, not {wanted}; delete it or use another --work")
        if not (store / "zarr.json").exists() or len(FeatureCache(store).scene_ids()) < self._expected_scenes():
            outdoor = self.config.setting == "outdoor"
            self._unit("extract", f"seed {seed}: extracting {domain} ({self.config.teacher})", lambda: extract_once(
                self.root(domain, seed), store, workers=self.config.workers, device=self.device,
                teacher=self.config.teacher, max_views=self.config.max_views, progress=self.bars,
                dataset=self.config.place.dataset, splits=("train", "test") if outdoor else ("train", "val")))
        return store

    def head2d(self, seed: int) -> Path:
        """The 2D branch of xMUDA and MM-TTA: fitted on the source cache's train split, beside the
        source's Joint-Train checkpoint (whose classes it predicts)."""
        from .head2d import fit_head2d, head2d_path

        joint = self.model(self.config.place.source, seed, "joint")
        path = head2d_path(joint)
        cache = self.cache(self.config.place.source, seed)
        with exclusive(path.with_name(path.name + ".lock")):
            if not path.is_file():
                self._unit("head2d", f"seed {seed}: fitting the 2D head on {self.config.place.source}",
                           lambda: fit_head2d(cache, joint, split="train", device=self.device))
        return path

    def model(self, domain: str, seed: int, kind: str) -> Path:
        """`joint` or `source_only` trained on `domain`'s train rooms (the Oracle: `joint` on a family)."""
        config = self.train_config(seed, kind)
        run = self.run_dir(domain, seed, kind)
        cache = self.cache(domain, seed)
        with exclusive(run.parent / f"{run.name}.lock"):
            return self._model(domain, seed, kind, config, run, cache)

    def _model(self, domain: str, seed: int, kind: str, config: TrainConfig, run: Path, cache: Path) -> Path:
        if (run / "last.pt").exists():
            from .checkpoint import load_checkpoint

            checkpoint = load_checkpoint(run / "last.pt")
            if _comparable(checkpoint.get("train_config")) != _comparable(asdict(config)):
                raise ValueError(f"{run / 'last.pt'}: trained with another config than this suite's; "
                                 "delete the run or use another --work")
            if checkpoint["epoch"] + 1 >= config.epochs:
                return run / "last.pt"
        label = {"joint": "Joint-Train", "source_only": "Source-Only"}[kind]
        return self._unit("train", f"seed {seed}: training {label} on {domain} ({config.model}, {config.epochs} epochs)",
                          lambda: train_once(cache, run, config, self.device, progress=self.bars))

    def _unit(self, kind: str, message: str, work):
        if not self.clock.fits(kind):
            raise OutOfTime(message)
        self.log(message)
        start = time.monotonic()
        result = work()
        self.clock.took(kind, time.monotonic() - start)
        return result


@contextmanager
def exclusive(lock: Path):
    """Hold an advisory lock on the file `lock` for the block. Suite processes that share a --work
    folder (one per GPU, each its own families of one seed) then wait for one another's generation,
    extraction and training and reuse the result: every row of a seed uses one trained instance
    (GPU training is not bit-reproducible, so two processes training the same model would not)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): one process per --work folder
        yield
        return
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _comparable(train_config: dict | None) -> dict | None:
    """A training config as JSON would give it back (tuples as lists), without `workers`."""
    if train_config is None:
        return None
    record = json.loads(json.dumps(train_config))
    for key in NO_EFFECT_ON_THE_MODEL:
        record.pop(key, None)
    return record


def cells_of(config: SuiteConfig) -> list[tuple[int, str, str]]:
    """(seed, family, row) of every cell, in work order."""
    cells = []
    for seed in config.seeds:
        for family in config.families:
            rows = IN_DISTRIBUTION_ROWS if family == IN_DISTRIBUTION else ORDER
            cells += [(seed, family, row) for row in rows if row in config.rows]
    return cells


def cell_path(out: Path, seed: int, family: str, row: str) -> Path:
    return out / "cells" / family / f"seed{seed}" / f"{slug(row)}.json"


def run_suite(config: SuiteConfig, out: Path, *, work: Path | None = None, device: str = "cpu",
              max_minutes: float | None = None, log=print, bars: bool = False, workspace=None) -> SuiteRun:
    """Compute every missing cell of `config` under `out` (work files under `work`, default
    out/work); stop cleanly before `max_minutes`. Then write the table, JSON and plots.
    `workspace`: anything with `cache(domain, seed)`, `model(domain, seed, kind)` and `device`
    (tests hand in ready-made caches and checkpoints)."""
    if config.setting not in SETTINGS:
        raise ValueError(f"unknown suite setting {config.setting!r}; choose from {', '.join(SETTINGS)}")
    for family in config.families:
        if family not in config.place.domains:
            raise ValueError(f"unknown shift family {family!r} of the {config.setting} suite; choose from "
                             f"{', '.join(config.place.domains)}")
    unknown = [row for row in config.rows if row not in ROWS]
    if unknown:
        raise ValueError(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    out = Path(out)
    import torch

    clock = Clock(max_minutes, out / "durations.json",
                  "cpu" if torch.device(device).type == "cpu" else environment()["device"])
    space = workspace or Workspace(config, Path(work) if work else out / "work", device=device, log=log, clock=clock,
                                   bars=bars)
    protocol = config.protocol()
    cells = cells_of(config)
    run = SuiteRun(done=sum(read_cell(cell_path(out, *c), protocol) is not None for c in cells), total=len(cells),
                   stopped=False)
    log(f"suite {config.name}: {run.done}/{run.total} cells already done")
    try:
        for seed, family, row in cells:
            path = cell_path(out, seed, family, row)
            if read_cell(path, protocol) is not None:
                continue
            _run_cell(space, config, seed, family, row, path, protocol, clock, log)
            run.done += 1
            run.ran.append(str(path.relative_to(out)))
            log(f"cells done: {run.done}/{run.total}")
    except OutOfTime as stop:
        run.stopped = True
        log(f"stopped before the time limit (next: {stop}); run the same command again to go on")
    write_summary(out, config)
    return run


def _run_cell(space, config: SuiteConfig, seed: int, family: str, row: str, path: Path, protocol: dict,
              clock: Clock, log) -> None:
    method, kind = next((m, k) for r, m, k in ROW_PLAN if r == row)
    place = config.place
    target = place.domains[family]
    checkpoint = space.model(target if kind == "oracle" else place.source, seed, "joint" if kind == "oracle" else kind)
    cache = space.cache(target, seed)
    head2d = space.head2d(seed) if method in MULTIMODAL else None
    scene_ids = FeatureCache(cache).scene_ids(split=place.target_split)
    # one class list for every row (paper Table 5; source and target share the dataset's labels)
    classes = scored_classes(place.dataset, FeatureCache(cache).provenance["dataset"])
    adapt = replace(config.adapt, seed=seed)
    label = f"seed {seed} · {family} · {row}"
    start = time.monotonic()
    digest = model_digest(checkpoint)
    if method in PER_SCENE:
        task = dict(row=row, method=method, checkpoint=checkpoint, cache=cache, config=adapt, device=space.device,
                    classes=classes, protocol=protocol)
        parts = _per_scene(task, path, scene_ids, jobs=config.jobs, gpus=config.scene_gpus, clock=clock, label=label,
                           log=log)
        result = combine([MethodResult(**parts[s]["result"]) for s in scene_ids])
        # the scenes may come from several calls: every model instance they used
        digests = sorted({parts[s].get("model_sha256") or "unrecorded" for s in scene_ids})
    else:
        if not clock.fits(method):
            raise OutOfTime(label)
        done = []

        def progress(scene_id):
            done.append(scene_id)
            log(f"{label}: scene {len(done)}/{len(scene_ids)} ({scene_id})")

        result = run_method(row, method, checkpoint, cache, scene_ids, config=adapt, device=space.device,
                            classes=classes, progress=progress, head2d=head2d)
        digests = [digest]
    parameters, changed = domain_record(place, target)
    write_json_atomic(path, {
        "suite": config.name, "setting": place.name, "protocol": protocol, "seed": seed, "family": family, "row": row,
        "method": method, "target_scenes": scene_ids, "classes": classes, "domain": parameters, "changed": changed,
        "model_sha256": digest, "parts_model_sha256": digests, **environment(), "result": asdict(result)})
    if method not in PER_SCENE:
        clock.took(method, time.monotonic() - start)


def _scene_part(task: dict, scene_id: str, part: Path) -> float:
    """Adapt and score one scene of an offline TTT-KD cell and save it as its own part -> seconds.
    Module level: it also runs in the cell's worker processes."""
    began = time.monotonic()
    result = run_method(task["row"], task["method"], task["checkpoint"], task["cache"], [scene_id],
                        config=task["config"], device=task["device"], classes=task["classes"])
    write_json_atomic(part, {"protocol": task["protocol"], "model_sha256": model_digest(task["checkpoint"]),
                             "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                             "result": asdict(result)})
    return time.monotonic() - began


def _quiet_worker(threads: int) -> None:
    import torch

    if not os.environ.get("OMP_NUM_THREADS"):  # an explicit setting (several suites on one host) wins
        torch.set_num_threads(threads)  # N workers with every core each would only contend


@contextmanager
def visible_gpus(ids: str | None):
    """CUDA_VISIBLE_DEVICES=ids for the processes started in the block (None: unchanged). A child
    reads it when its CUDA starts, so it must be in the environment it starts with."""
    if ids is None:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ids
    try:
        yield
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def _per_scene(task: dict, path: Path, scene_ids: list[str], *, jobs: int, clock: Clock, label: str,
               log, gpus: tuple[str, ...] = ()) -> dict[str, dict]:
    """Every scene's part record of an offline cell (saved ones are read back), computed by `jobs`
    processes (on each of `gpus`, when given); stops (OutOfTime) before starting a scene that would
    end past the clock's deadline."""
    parts = {}
    todo = []
    for scene_id in scene_ids:
        record = read_cell(path.with_suffix("") / f"{scene_id}.json", task["protocol"])
        if record is None:
            todo.append(scene_id)
        else:
            parts[scene_id] = record
    method = task["method"]
    count = len(scene_ids)

    def finished(scene_id: str, seconds: float) -> None:
        clock.took(method, seconds)
        parts[scene_id] = read_cell(path.with_suffix("") / f"{scene_id}.json", task["protocol"])
        log(f"{label}: scene {len(parts)}/{count} ({scene_id}, {seconds:.0f} s)")

    if (jobs <= 1 and not gpus) or not todo:
        for scene_id in todo:
            if not clock.fits(method):
                raise OutOfTime(f"{label}, {len(parts)}/{count} scenes done")
            finished(scene_id, _scene_part(task, scene_id, path.with_suffix("") / f"{scene_id}.json"))
        return parts
    from concurrent.futures import FIRST_COMPLETED, wait

    # one process per slot, each on its GPU for its life; round robin, so the first scenes go to distinct GPUs
    slots = [gpu for _ in range(jobs) for gpu in (gpus or (None,))][:len(todo)]
    if gpus and task["device"].startswith("cuda"):
        task = dict(task, device="cuda")  # the one GPU the slot's process sees
    threads = max(1, (os.cpu_count() or 2) // len(slots))
    pools: dict[int, ProcessPoolExecutor] = {}
    running, queue, stopped = {}, list(todo), False
    try:
        while queue or running:
            busy = {slot for slot, _ in running.values()}
            for slot, gpu in enumerate(slots):
                if not queue or stopped or slot in busy:
                    continue
                if not clock.fits(method):
                    stopped = True
                    break
                scene_id = queue.pop(0)
                with visible_gpus(gpu):  # a pool starts its process on the first submit
                    if slot not in pools:
                        pools[slot] = ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=_quiet_worker,
                                                          initargs=(threads,))
                    future = pools[slot].submit(_scene_part, task, scene_id, path.with_suffix("") / f"{scene_id}.json")
                running[future] = (slot, scene_id)
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                _, scene_id = running.pop(future)
                finished(scene_id, future.result())
    finally:
        for pool in pools.values():
            pool.shutdown(cancel_futures=True)
    if len(parts) < count:
        raise OutOfTime(f"{label}, {len(parts)}/{count} scenes done")
    return parts


def combine(parts: list[MethodResult]) -> MethodResult:
    """One result from results on disjoint scenes: confusions add, mIoU is recomputed from the sum."""
    steps = sorted(int(s) for s in parts[0].confusion_by_step)
    confusion = {s: sum(np.asarray(p.confusion_by_step[str(s)] if str(s) in p.confusion_by_step
                                   else p.confusion_by_step[s]) for p in parts) for s in steps}
    final = confusion[steps[-1]]
    names = list(parts[0].iou)
    first = parts[0]
    return MethodResult(
        row=first.row, method=first.method, checkpoint=first.checkpoint, miou=mean_iou(final),
        iou={n: float(v) for n, v in zip(names, iou_per_class(final))},
        per_scene_miou={k: v for p in parts for k, v in p.per_scene_miou.items()}, updates=sum(p.updates for p in parts),
        seconds=sum(p.seconds for p in parts), miou_by_step={s: mean_iou(c) for s, c in confusion.items()},
        kd_loss_by_step=first.kd_loss_by_step, confusion_by_step={s: c.tolist() for s, c in confusion.items()})


# ---- aggregation: table, JSON, plots -------------------------------------------------------------

def load_cells(out: Path) -> list[dict]:
    """Every finished cell under `out` (half-written ones skipped)."""
    cells = []
    for path in sorted((Path(out) / "cells").glob("*/seed*/*.json")):
        try:
            record = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(record, dict) and "result" in record:
            cells.append(record)
    return cells


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value), in mIoU points."""
    array = 100 * np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def mean_std_text(entry: dict) -> str:
    """"mean ± std" of a table entry; one seed has no spread: its value alone, not "± 0.0"."""
    return f"{entry['mean']:.1f}" + (f" ± {entry['std']:.1f}" if entry["n"] > 1 else "")


def summarise(cells: list[dict], families: list[str]) -> dict:
    """{row: {family: {mean, std, n, seeds, by_step}}} over the per-seed cells."""
    table: dict[str, dict] = {}
    for row in ROWS:
        for family in families:
            mine = sorted((c for c in cells if c["row"] == row and c["family"] == family), key=lambda c: c["seed"])
            if not mine:
                continue
            mean, std = mean_std([c["result"]["miou"] for c in mine])
            steps = sorted({int(s) for c in mine for s in c["result"]["miou_by_step"]})
            by_step = {}
            for s in steps:
                values = [c["result"]["miou_by_step"][str(s)] for c in mine if str(s) in c["result"]["miou_by_step"]]
                if len(values) == len(mine):
                    by_step[s] = mean_std(values)
            table.setdefault(row, {})[family] = {"mean": mean, "std": std, "n": len(mine),
                                                 "seeds": [c["seed"] for c in mine], "by_step": by_step}
    return table


def family_title(family: str) -> str:
    return "none (in-distribution)" if family == IN_DISTRIBUTION else family


def markdown_summary(table: dict, families: list[str], *, title: str, seeds: int, paper: dict | None = None,
                     paper_label: str = "paper") -> str:
    """Rows x families, "mean ± std" in mIoU points; "(n=k)" marks a cell with fewer seeds than asked.
    With `paper` (row -> the paper's mIoU), a last column puts the paper's number beside ours."""
    extra = [paper_label] if paper else []
    lines = [f"### {title}", "", "| row | " + " | ".join([family_title(f) for f in families] + extra) + " |",
             "|---|" + "---:|" * (len(families) + len(extra))]
    for row in ROWS:
        if row not in table:
            continue
        cells = []
        for family in families:
            entry = table[row].get(family)
            if entry is None:
                cells.append("-")
                continue
            text = mean_std_text(entry)
            cells.append(text if entry["n"] == seeds else f"{text} (n={entry['n']})")
        if paper:
            cells.append(f"{paper[row]:.1f}" if row in paper else "-")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def after_steps(entry: dict | None, step: int) -> dict | None:
    """A row's mIoU after `step` TTT steps from its per-step curve ("by_step": {step: [mean, std]};
    keys are strings once read back from JSON), as an entry like the final one; None if not scored."""
    by_step = (entry or {}).get("by_step") or {}
    value = by_step.get(str(step), by_step.get(step))
    return None if value is None else {"mean": value[0], "std": value[1], "n": entry["n"]}


def steps_table(table: dict, families: list[str]) -> str:
    """mIoU against TTT steps (paper Fig. 4a) as numbers: per family, each row scored after several
    steps in one run (TTT-KD and its control), "mean ± std" over seeds; "" if no row has steps."""
    rows = [(family, row) for family in families for row in ROWS
            if len(table.get(row, {}).get(family, {}).get("by_step", {})) > 1]
    if not rows:
        return ""
    steps = sorted({s for family, row in rows for s in table[row][family]["by_step"]})
    lines = ["### mIoU against TTT steps, mean ± std over seeds", "",
             "| family | row | " + " | ".join(map(str, steps)) + " |", "|---|---|" + "---:|" * len(steps)]
    for family, row in rows:
        cells = [mean_std_text(e) if (e := after_steps(table[row][family], s)) else "-" for s in steps]
        lines.append(f"| {family_title(family)} | {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def per_class_tables(cells: list[dict], families: list[str]) -> str:
    """Per family, each row's per-class IoU averaged over its seeds (experiment.markdown_table)."""
    text = []
    for family in families:
        mine = [c for c in cells if c["family"] == family]
        if not mine:
            continue
        classes = mine[0]["classes"]
        results = []
        for row in ROWS:
            seeds = [c["result"] for c in mine if c["row"] == row]
            if seeds:
                with np.errstate(all="ignore"):
                    iou = {n: float(np.nanmean([r["iou"].get(n, math.nan) for r in seeds])) if any(
                        math.isfinite(r["iou"].get(n, math.nan)) for r in seeds) else math.nan for n in classes}
                results.append(MethodResult(row=row, method=seeds[0]["method"], checkpoint="-",
                                            miou=float(np.mean([r["miou"] for r in seeds])), iou=iou,
                                            per_scene_miou={}, updates=0, seconds=0.0))
        text.append(markdown_table(results, title=f"{family_title(family)}: IoU per class, mean over seeds",
                                   classes=classes))
    return "\n".join(text)


STYLE = {"Oracle": ("black", "*"), "Source-Only": ("tab:gray", "s"), "Joint-Train": ("tab:brown", "D"),
         "TENT": ("tab:orange", "^"), "DUA": ("tab:green", "v"), "AdaContrast": ("tab:purple", "P"),
         "xMUDA": ("tab:olive", "h"), "MM-TTA": ("tab:pink", "d"),
         "TTT-KD-O": ("tab:cyan", "X"), "TTT-KD": ("tab:blue", "o"), SHUFFLED: ("tab:red", "x")}


def plot_family(table: dict, family: str, path: Path) -> bool:
    """mIoU vs TTT steps for one family: TTT-KD (and its control) as curves with ± std bands, every
    other row a flat line at its mIoU, each in its own colour and marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {row: table[row][family] for row in ROWS if family in table.get(row, {})}
    steps = sorted({s for entry in curves.values() for s in entry["by_step"]})
    if not steps:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for row, entry in curves.items():
        colour, marker = STYLE[row]
        if entry["by_step"]:
            xs = sorted(entry["by_step"])
            mean = np.array([entry["by_step"][s][0] for s in xs])
            std = np.array([entry["by_step"][s][1] for s in xs])
            ax.plot(xs, mean, color=colour, marker=marker, label=row, linewidth=2)
            ax.fill_between(xs, mean - std, mean + std, color=colour, alpha=0.15)
        else:
            ax.plot(steps, [entry["mean"]] * len(steps), color=colour, marker=marker, linestyle="--", linewidth=1,
                    markersize=5, label=row)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_xlabel("TTT steps per scene and rotation")
    ax.set_ylabel("mIoU (%)")
    n = max(entry["n"] for entry in curves.values())
    ax.set_title(f"shift family: {family_title(family)} (mean ± std over {n} seed{'s' * (n > 1)})")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_summary(out: Path, config: SuiteConfig) -> dict:
    """results.json, results.md (rows x families, then per-class tables) and one plot per family,
    from the cells alone."""
    out = Path(out)
    cells = [c for c in load_cells(out) if with_defaults(c.get("protocol")) == config.protocol()]
    # every family with cells, in the setting's order: processes that share `out` with other
    # families each write the whole table
    families = [f for f in config.place.domains if any(c["family"] == f for c in cells)]
    table = summarise(cells, families)
    # the seeds of the cells in `out`: several processes (one seed each) may share it
    seeds = sorted({c["seed"] for c in cells} | set(config.seeds))
    title = f"embedded domain-shift suite `{config.name}`: mIoU (%) mean ± std over seeds {', '.join(map(str, seeds))}"
    place = config.place
    text = markdown_summary(table, families, title=title, seeds=len(seeds), paper=place.paper,
                            paper_label=place.paper_label)
    mixed = mixed_instances(cells)
    if mixed:
        text += ("\nRows of one seed compared across trainings of the same config (models retrained on a fresh "
                 "machine; GPU training is not bit-reproducible): " + "; ".join(mixed) + ".\n")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"results.md.tmp{os.getpid()}"  # processes sharing `out` never leave a torn file
    steps = steps_table(table, families)
    tmp.write_text(text + "\n" + (steps + "\n" if steps else "") + per_class_tables(cells, families))
    os.replace(tmp, out / "results.md")
    plots = [f"miou_vs_steps_{f}.png" for f in families if plot_family(table, f, out / f"miou_vs_steps_{f}.png")]
    record = {"suite": config.name, "config": asdict(config), "protocol": config.protocol(), **environment(),
              "families": {f: dict(zip(("parameters", "changed"), domain_record(place, place.domains[f])))
                           for f in families},
              "paper": place.paper, "mixed_model_instances": mixed,
              "table": table, "plots": plots,
              "cells": [{k: c[k] for k in ("seed", "family", "row", "method", "device", "date")}
                        | {"model_sha256": c.get("model_sha256")}
                        | {"miou": c["result"]["miou"], "miou_by_step": c["result"]["miou_by_step"]} for c in cells]}
    write_json_atomic(out / "results.json", record)
    return record
