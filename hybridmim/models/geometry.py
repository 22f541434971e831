"""The crop / region / patch geometry that the HybridMIM model's region tokens and the masking
labels share (shapes are explained in hybridmim.pretrain.masking)."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class MaskGeometry:
    """Edges in voxels; the spec schema has made each a positive integer."""

    crop: int
    region: int
    patch: int

    def __post_init__(self) -> None:
        if self.crop % self.region:
            raise ValueError(
                f"geometry.crop ({self.crop}) must be a multiple of geometry.region "
                f"({self.region}); use a crop of a whole number of regions, e.g. "
                f"{self.region * max(1, self.crop // self.region)}")
        if self.region % self.patch:
            raise ValueError(
                f"geometry.region ({self.region}) must be a multiple of geometry.patch "
                f"({self.patch}); choose a patch size that divides the region size")

    @classmethod
    def coerce(cls, geometry: "MaskGeometry | Mapping[str, Any]") -> "MaskGeometry":
        if isinstance(geometry, MaskGeometry):
            return geometry
        return cls(crop=geometry["crop"], region=geometry["region"], patch=geometry["patch"])

    @property
    def patch_grid(self) -> int:
        return self.crop // self.patch

    @property
    def region_grid(self) -> int:
        return self.crop // self.region

    @property
    def patches_per_region_axis(self) -> int:
        return self.region // self.patch

    @property
    def num_patches(self) -> int:
        return self.patch_grid ** 3

    @property
    def num_regions(self) -> int:
        return self.region_grid ** 3

    @property
    def patches_per_region(self) -> int:
        return self.patches_per_region_axis ** 3
