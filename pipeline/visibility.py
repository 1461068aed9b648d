"""How well the projection's depth test finds the points a view really sees, measured against the
embedded generator's exact visibility (`tttkd bench visibility`).

For each generated room and view, the truth is a ray cast from the camera centre to every clean
surface point: visible if nothing lies in between. The projection sees what extraction sees: the
points with the domain's sensor noise and the rendered depth image stored in millimetres. Among the
points inside the image (the projection's own frustum and border test), a depth test accepts a
point when |depth - z| <= depth_tolerance_m + depth_tolerance * depth:

    precision = accepted and truly visible / accepted       (features given to the right points)
    recall    = accepted and truly visible / truly visible  (features not thrown away)

counted over (point, view) pairs, plus the share of points given features although every view
that accepted them was occluded (the "feature on a hidden point" error the cache would keep).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .project import ProjectionConfig, project_view
from .synth import DOMAINS, make_room, render, visible_from


@dataclass
class VisibilityResult:
    depth_tolerance: float
    depth_tolerance_m: float
    precision: float
    recall: float
    hidden_feature_share: float
    """Of the points that receive features, the share that no accepting view truly sees."""
    pairs: int
    """(point, view) pairs inside the image that are truly visible."""


def visibility_study(tolerances: list[tuple[float, float]], *, scenes: int = 4, views: int = 8, domain: str = "a",
                     seed: int = 0, config: ProjectionConfig = ProjectionConfig()) -> list[VisibilityResult]:
    """Precision and recall of the depth test for each (relative, absolute metres) tolerance over
    `scenes` generated rooms."""
    counts = {t: np.zeros(3, np.int64) for t in tolerances}  # accepted & true, accepted, true
    hidden = {t: [0, 0] for t in tolerances}  # points with features none of whose views is true, with features
    for index in range(scenes):
        rng = np.random.default_rng([seed, ord(domain), index])  # as `synth.generate` draws room `index`
        room = make_room(rng, DOMAINS[domain], views)
        accepted_true = {t: np.zeros(len(room.coord), bool) for t in tolerances}
        accepted_any = {t: np.zeros(len(room.coord), bool) for t in tolerances}
        for pose in room.poses:
            _, depth = render(room.boxes, pose, room.camera, DOMAINS[domain])
            depth_mm = np.round(depth * 1000)  # what the written 16-bit PNG holds
            inside = project_view(room.coord, pose, room.camera, config=replace(config, depth_tolerance_m=np.inf),
                                  depth=depth_mm, depth_camera=room.camera, depth_scale=1000.0).point_index
            truth = np.zeros(len(room.coord), bool)
            truth[inside] = visible_from(room, pose)[inside]
            for t in tolerances:
                seen = project_view(room.coord, pose, room.camera,
                                    config=replace(config, depth_tolerance=t[0], depth_tolerance_m=t[1]),
                                    depth=depth_mm, depth_camera=room.camera, depth_scale=1000.0).point_index
                counts[t] += (truth[seen].sum(), len(seen), truth.sum())
                accepted_any[t][seen] = True
                accepted_true[t][seen[truth[seen]]] = True
        for t in tolerances:
            hidden[t][0] += int((accepted_any[t] & ~accepted_true[t]).sum())
            hidden[t][1] += int(accepted_any[t].sum())
    return [VisibilityResult(*t, float(c[0] / max(c[1], 1)), float(c[0] / max(c[2], 1)),
                             hidden[t][0] / max(hidden[t][1], 1), int(c[2])) for t, c in counts.items()]
