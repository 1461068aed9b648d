"""tttkd.pipeline: offline extraction of the feature cache (`tttkd-prep`).

The data path, one module a stage:
    scene.py / scannet.py / synth.py   dataset -> Scene (points) + View (posed images)
    project.py                          points x view -> the pixels each view sees
    teacher.py (dinov2.py, efficientnet.py)   images -> frozen 2D feature grids -> per-point features
    cache.py                            per-point features -> the Zarr v3 feature cache
    extract.py                          one scene, end to end
    job.py                              the Dask job over many scenes
"""

from .cache import CacheError, CachedScene, FeatureCache
from .project import Projection, ProjectionConfig, project_view
from .scene import Camera, Scene, SceneReadError, View, ViewSet
from .teacher import TEACHERS, Teacher, WeightsNotFoundError, load_teacher

__all__ = [
    "CacheError", "CachedScene", "Camera", "FeatureCache", "Projection", "ProjectionConfig", "Scene",
    "SceneReadError", "TEACHERS", "Teacher", "View", "ViewSet", "WeightsNotFoundError", "load_teacher",
    "project_view",
]
