"""tttkd: TTT-KD, test-time training for 3D semantic segmentation by 2D -> 3D knowledge distillation.

Subpackages:
  tttkd.pipeline        offline extraction: dataset readers, projection, teachers, the Zarr feature cache
  tttkd.cli             the `tttkd-prep` and `tttkd` command-line apps
  tttkd.data_manifests  class lists, label maps and split lists
"""

__version__ = "0.1.0"
