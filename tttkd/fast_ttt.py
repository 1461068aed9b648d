"""The TTT step as a replayed CUDA graph (used by adapt.TTTKD.step on CUDA).

One TTT step on MinkUNet34C launches about 1,200 kernels (forward, backward, and SGD over 177
tensors); at ScanNet sizes the GPU runs them faster than the host launches them, so the step is
bound by the host. With the index pairs recorded for a rotation (model.IndexPairs), the step has
fixed shapes and fixed addresses: capture it once as a CUDA graph and replay it, one launch per
step. What changes between steps (the KD voxels and their targets) is copied into the graph's
input buffers; the parameters are updated in place (SGD, and TTTKD.reset's load_state_dict copies
into them), so one capture serves the whole rotation. The graph computes the eager step's
kernels in the eager step's order: the same results.

History (H200, spconv-cu126 2.3.8, 2026-11-26): the capture was first refused. spconv's GEMM
launcher allocated cumm scratch tensors with cudaMalloc inside the step (24 cudaMalloc/cudaFree a
step with the pairs reused), which a capturing stream does not allow. They came from the 5^3 stem
(Native algorithm, see model.GatherStem); with the stem gathered, the step makes no cudaMalloc,
cudaFree or stream sync, the capture succeeds, and a replayed step costs its kernel time: 18.8 ms
instead of 58.8 ms eager at 25k voxels, 35.0 instead of 45.8 at 100k, 107 at 400k either way
(`tttkd bench ttt --graph`). So AdaptConfig.cuda_graph is on; if a capture is refused (another
spconv build, another model), the step warns once and runs eagerly, with the same results.
"""

from __future__ import annotations

import warnings

import torch


def capturable(kd_target: torch.Tensor) -> bool:
    """Graphs are a CUDA feature; a failed capture (see CapturedStep) switches them off for good."""
    return kd_target.is_cuda and not _capture_failed


_capture_failed = False


class CapturedStep:
    """`step(rotated_scene, kd_voxel, kd_target) -> loss` captured for one rotated scene.

    Construction takes one real step (PyTorch's rule: warm up on a side stream before capture);
    its loss is `warmup_loss`. Calling it replays the captured step on new KD voxels and targets of
    the same shapes. If the capture fails, it warns once and later steps run eagerly.
    """

    def __init__(self, step, rotated_scene, kd_voxel: torch.Tensor, kd_target: torch.Tensor):
        global _capture_failed
        self.rotated_scene, self.voxels = rotated_scene, rotated_scene.voxels
        self.kd_voxel, self.kd_target = kd_voxel.clone(), kd_target.clone()  # the graph's input buffers
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.warmup_loss = step(rotated_scene, self.kd_voxel, self.kd_target)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        try:
            # captured on the warm-up's stream: a library that keeps scratch memory per stream
            # then finds it allocated already
            with torch.cuda.graph(self.graph, stream=side):
                self.loss = step(rotated_scene, self.kd_voxel, self.kd_target)
        except RuntimeError as error:  # e.g. a library synchronising inside the step
            _capture_failed = True
            self.graph = None  # and hold no scene: a failed capture must not keep its voxels alive
            self.rotated_scene = self.voxels = self.kd_voxel = self.kd_target = None
            warnings.warn(f"the TTT step could not be captured as a CUDA graph ({str(error).splitlines()[0]}); "
                          "running it eagerly (AdaptConfig.cuda_graph=False skips the attempt)", RuntimeWarning)

    def fits(self, rotated_scene, kd_voxel: torch.Tensor, kd_target: torch.Tensor) -> bool:
        """The graph reads this scene's voxel tensors: same scene object, same voxels, same shapes."""
        return (self.graph is not None and rotated_scene is self.rotated_scene and rotated_scene.voxels is self.voxels
                and kd_voxel.shape == self.kd_voxel.shape and kd_target.shape == self.kd_target.shape
                and kd_target.dtype == self.kd_target.dtype)

    def __call__(self, kd_voxel: torch.Tensor, kd_target: torch.Tensor) -> torch.Tensor:
        self.kd_voxel.copy_(kd_voxel)
        self.kd_target.copy_(kd_target)
        self.graph.replay()
        return self.loss.clone()  # the graph overwrites its loss at the next replay
