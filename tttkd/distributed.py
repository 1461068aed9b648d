"""Data-parallel training and scene-parallel adaptation over several processes (one per GPU, or
CPU processes with gloo for tests).

Training (DDP): every process builds the same model, trains on its part of each global batch
(data.ShardedBatchSampler) and DistributedDataParallel averages the gradients. Two things make N
processes compute the step one process would compute on the whole global batch:
- batch norm over the global batch: `GlobalBatchNorm` all-reduces each layer's sums (forward) and
  gradient sums (backward), on CPU (gloo) and CUDA (NCCL) alike; torch's SyncBatchNorm refuses
  CPU tensors, and one implementation means the CPU test covers what the GPUs run;
- losses that are means over the global batch: each process scales its mean by its share of the
  global count of labelled voxels / KD targets (`global_share`), times the process count that
  DDP's averaging divides by.

Launch with `torchrun --nproc-per-node N -m tttkd.cli.main train ...` (reads RANK, WORLD_SIZE,
LOCAL_RANK) or `tttkd train --gpus N` (`launch` spawns the processes).
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.nn as nn

_bn_group = None  # a process group of its own for batch-norm collectives (not interleaved with DDP's)


def rank_and_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init(rank: int, world_size: int, *, backend: str) -> None:
    """Join the process group (MASTER_ADDR/MASTER_PORT from the environment)."""
    global _bn_group
    # rank 0 validates and saves while the others wait in the next collective: NCCL's default
    # 10 minutes would abort a long validation
    timeout = datetime.timedelta(hours=2)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    _bn_group = dist.new_group(backend=backend, timeout=timeout)


def init_from_env(device: str) -> tuple[int, int, str]:
    """Under torchrun: join the group named by RANK/WORLD_SIZE -> (rank, world size, this process's
    device: cuda:LOCAL_RANK on CUDA). Without those variables: (0, 1, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.device(device).type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    init(rank, world_size, backend="nccl" if torch.device(device).type == "cuda" else "gloo")
    return rank, world_size, device


def finish() -> None:
    global _bn_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _bn_group = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank: int, world_size: int, port: int, device: str, fn, args, kwargs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{rank}"
        torch.cuda.set_device(device)
    init(rank, world_size, backend="nccl" if cuda else "gloo")
    try:
        fn(*args, device=device, **kwargs)
    finally:
        finish()


def launch(world_size: int, fn, *args, device: str = "cuda", **kwargs) -> None:
    """Run fn(*args, device=..., **kwargs) in `world_size` new processes joined in one group:
    process r on cuda:r (NCCL), or on CPU (gloo). `fn` must be importable (a module-level function)."""
    if torch.device(device).type == "cuda" and world_size > torch.cuda.device_count():
        raise ValueError(f"--gpus {world_size}: this machine has {torch.cuda.device_count()} CUDA devices")
    _spawn(_run, (world_size, free_port(), device, fn, args, kwargs), world_size)


def _spawn(fn, args: tuple, nprocs: int) -> None:
    """torch.multiprocessing.spawn; a process's error becomes one ValueError with its last line."""
    try:
        torch.multiprocessing.spawn(fn, args=args, nprocs=nprocs)
    except torch.multiprocessing.ProcessRaisedException as e:
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        raise ValueError(f"a process failed: {lines[-1] if lines else e}") from e


class _GlobalNorm(torch.autograd.Function):
    """x -> (x - mean) / sqrt(var + eps) with the mean and biased variance of the global batch.
    Forward all-reduces [sum, sum of squares, count] per channel, backward [sum g, sum g·x̂]: the
    exact batch-norm gradient over the concatenated batch, one collective each way."""

    @staticmethod
    def forward(ctx, x, eps, group):
        x64 = x.double()  # sums of squares in float64: var = E[x²] - mean² without cancellation
        stats = torch.cat([x64.sum(0), (x64 * x64).sum(0), x64.new_full((1,), len(x))])
        dist.all_reduce(stats, group=group)
        channels = x.shape[1]
        count = stats[-1]
        mean = stats[:channels] / count
        var = (stats[channels:2 * channels] / count - mean * mean).clamp(min=0)
        invstd = torch.rsqrt(var + eps)
        xhat = ((x64 - mean) * invstd).to(x.dtype)
        ctx.save_for_backward(xhat, invstd.to(x.dtype), count.to(x.dtype))
        ctx.group = group
        return xhat, mean.to(x.dtype), var.to(x.dtype), count.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_xhat, *_):
        xhat, invstd, count = ctx.saved_tensors
        sums = torch.cat([grad_xhat.sum(0), (grad_xhat * xhat).sum(0)])
        dist.all_reduce(sums, group=ctx.group)
        mean_g, mean_gx = (sums / count).chunk(2)
        return (grad_xhat - mean_g - xhat * mean_gx) * invstd, None, None


class GlobalBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch, over every process
    (`_GlobalNorm`). Running statistics follow nn.BatchNorm1d (unbiased variance over the global
    count), so every process holds the same ones. In eval mode, or with one process, it is
    nn.BatchNorm1d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        xhat, mean, var, count = _GlobalNorm.apply(x.float(), self.eps, _bn_group)
        with torch.no_grad():  # no .item(): no host sync
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - momentum).add_(mean * momentum)
            self.running_var.mul_(1 - momentum).add_(var * count / (count - 1).clamp(min=1) * momentum)
        return (xhat * self.weight + self.bias).to(x.dtype)


BATCH_NORM_MODES = ("global", "fused", "local")
"""Batch norm under DDP: `global` (GlobalBatchNorm: the global batch's statistics, any backend, the
path the CPU tests check), `fused` (torch.nn.SyncBatchNorm: the same statistics with torch's fused
CUDA kernels, CUDA only; a few kernels a layer where GlobalBatchNorm launches ~20, in a step bound
by kernel launches), `local` (each process's own batch, as with plain DDP)."""


def convert_batch_norm(module: nn.Module, mode: str = "global") -> nn.Module:
    """Every nn.BatchNorm1d (spconv's and the heads') -> GlobalBatchNorm (`global`) or
    nn.SyncBatchNorm (`fused`), with its parameters and running statistics; `local` keeps them."""
    if mode not in BATCH_NORM_MODES:
        raise ValueError(f"unknown DDP batch norm {mode!r}; choose from {', '.join(BATCH_NORM_MODES)}")
    if mode == "local":
        return module
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            kind = GlobalBatchNorm if mode == "global" else nn.SyncBatchNorm
            extra = {} if mode == "global" else {"process_group": _bn_group}
            new = kind(child.num_features, eps=child.eps, momentum=child.momentum, affine=child.affine,
                       track_running_stats=child.track_running_stats, **extra).to(child.weight.device)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_batch_norm(child, mode)
    return module


def global_share(local_count: torch.Tensor) -> torch.Tensor:
    """(k,) local counts -> world size · local / global per entry: the factor that turns each
    process's mean loss into its part of the global-batch mean, once DDP averages the gradients."""
    counts = local_count.float()
    total = counts.clone()
    dist.all_reduce(total)
    return dist.get_world_size() * counts / total.clamp(min=1)


# Offline adaptation: scenes are independent (each starts from the source weights), so N processes
# each take every N-th scene and the parent adds up their confusion matrices.

def _adapt_part(rank: int, world_size: int, device: str, out: str, args: tuple, kwargs: dict) -> None:
    import json
    from dataclasses import asdict

    from .experiment import run_method

    if torch.device(device).type == "cuda":
        device = f"cuda:{rank}"
        torch.cuda.set_device(device)
    row, method, checkpoint, cache, scene_ids = args
    result = run_method(row, method, checkpoint, cache, scene_ids[rank::world_size], device=device, **kwargs)
    with open(os.path.join(out, f"part{rank}.json"), "w") as f:
        json.dump(asdict(result), f)


def spread_scenes(world_size: int, row: str, method: str, checkpoint, cache, scene_ids: list[str], *, device,
                  **kwargs):
    """`experiment.run_method` with the scenes spread over `world_size` processes (process r on
    cuda:r, or on CPU): the same result as one process, with per-scene entries in scene order."""
    import json
    import tempfile
    import time

    import numpy as np

    from .experiment import MethodResult
    from .metrics import iou_per_class, mean_iou

    if torch.device(device).type == "cuda" and world_size > torch.cuda.device_count():
        raise ValueError(f"--gpus {world_size}: this machine has {torch.cuda.device_count()} CUDA devices")
    world_size = min(world_size, len(scene_ids))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        _spawn(_adapt_part, (world_size, str(device), out, (row, method, checkpoint, cache, scene_ids), kwargs),
               world_size)
        parts = [json.loads(open(os.path.join(out, f"part{r}.json")).read()) for r in range(world_size)]
    confusion = {int(s): sum(np.asarray(p["confusion_by_step"][s]) for p in parts) for s in parts[0]["confusion_by_step"]}
    final = confusion[max(confusion)]
    per_scene = {}
    for p in parts:
        per_scene.update(p["per_scene_miou"])
    return MethodResult(
        row=row, method=parts[0]["method"], checkpoint=str(checkpoint), miou=mean_iou(final),
        iou={name: float(v) for name, v in zip(parts[0]["iou"], iou_per_class(final))},
        per_scene_miou={s: per_scene[s] for s in scene_ids}, updates=sum(p["updates"] for p in parts),
        seconds=time.perf_counter() - start,
        miou_by_step={s: mean_iou(c) for s, c in confusion.items()} if parts[0]["miou_by_step"] else {},
        kd_loss_by_step=parts[0]["kd_loss_by_step"],  # process 0 adapts the first scene
        confusion_by_step={s: c.tolist() for s, c in confusion.items()})
