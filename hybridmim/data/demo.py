"""The embedded demo: small generated datasets that mirror the four real ones, so the whole
workflow runs without data access.

Each case is a phantom built in patient coordinates (millimetres, RAS: +x = patient's left→right,
+y = posterior→anterior, +z = inferior→superior) from smooth, randomly deformed ellipsoids, then
sampled on a voxel grid and written in the canonical MSD layout as NIfTI. Position, size, shape,
tissue intensities and noise change per case, so a network has to learn the anatomy rather than
memorise a template. Arrays are stored the way scanners usually deliver them (LPS: x and y
flipped), so preprocessing's reorientation to RAS is exercised on every run.

- ``brats``: 4 MRI channels (t1, t1ce, t2, flair) with distinct tissue contrasts, 1 mm isotropic;
  a skull-stripped brain (grey/white matter, ventricles) with a nested tumour: necrosis (1) inside
  enhancing tumour (4) inside edema (2).
- ``btcv``: abdominal CT in HU (fat, muscle wall, spine) with the 13 BTCV organs at plausible
  relative positions.
- ``liver``: the same abdomen, liver (1) with tumours (2) inside; other organs are unlabelled.
- ``spleen``: the same abdomen, spleen (1) only.

The phantoms are scaled-down bodies whose structures are large relative to the field of view (the
spleen ~2.5 % of the foreground-cropped volume instead of a patient's ~0.5 %, the liver ~8 %, the
whole BraTS tumour ~5 %), so that the demo's CPU-sized fine-tuning (tens of seconds per job)
learns them; the small BTCV organs (adrenals, esophagus, veins, pancreas) stay hard, as in the
real data. Raw volumes are 27–74 voxels per axis; after resampling to the
recipe spacing and cropping to the foreground they are ~43 x 34 x 32 (CT, 1.5 x 1.5 x 2 mm) and
~42 x 44 x 36 (MRI, 1 mm). Output bytes depend only on the arguments.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hybridmim.data.layout import (LAYOUT_DIRS, atomic_directory, listed_files, make_index,
                                   read_json_or_none, save_nifti, write_json)
from hybridmim.dataset_catalog import get_dataset

DEMO_KINDS = ("brats", "btcv", "liver", "spleen")
GENERATOR_VERSION = 2  # bump when the phantoms change, so existing demo folders are rebuilt


# ---------------------------------------------------------------------------------------------
# Geometry
class _Grid:
    """Voxel centres along the R, A and S axes (mm); arrays built on it are in RAS order."""

    def __init__(self, fov_mm, spacing, origin):
        self.spacing = np.asarray(spacing, dtype=float)
        counts = [int(round(f / s)) for f, s in zip(fov_mm, spacing)]
        self.axes = [(np.arange(n) - (n - 1) / 2) * s + o
                     for n, s, o in zip(counts, spacing, origin)]
        self.shape = tuple(counts)

    def blob(self, rng, center, radii, wobble=0.1, tilt_deg=15.0,
             extruded=False) -> np.ndarray:
        """Boolean mask of a smooth deformed ellipsoid. The surface radius along each direction u
        is scaled by 1 + sum_k a_k sin(w_k·u + phi_k): low-frequency bumps, so the shape stays
        organ-like. ``extruded`` makes an elliptic cylinder through the whole z range (trunk,
        spine, great vessels), rotated about z only and computed in 2D. Only the bounding box is
        evaluated, which keeps a case at tens of ms."""
        center = np.asarray(center, float)
        radii = np.asarray(radii, float) if not extruded else np.append(np.asarray(radii[:2]), 1.0)
        angles = np.deg2rad(rng.uniform(-tilt_deg, tilt_deg, 3))
        if extruded:
            angles[:2] = 0.0
        rotation = _rotation(angles)
        amplitudes = rng.uniform(0.0, wobble, 3) / 3 * 2
        frequencies = rng.normal(0.0, 2.0, (3, 3))
        phases = rng.uniform(0, 2 * np.pi, 3)
        reach = radii.max() * (1 + amplitudes.sum()) + 1e-3
        mask = np.zeros(self.shape, dtype=bool)
        windows = [np.nonzero(np.abs(axis - c) <= reach)[0] for axis, c in zip(self.axes, center)]
        if extruded:
            windows[2] = np.arange(self.shape[2])
        if any(len(w) == 0 for w in windows):
            return mask
        box = tuple(slice(w[0], w[-1] + 1) for w in windows)
        offsets = [(self.axes[i][box[i]] - center[i]).astype(np.float32) for i in range(2)]
        offsets = [offsets[0][:, None, None], offsets[1][None, :, None],
                   np.zeros((1, 1, 1), np.float32) if extruded else
                   (self.axes[2][box[2]] - center[2]).astype(np.float32)[None, None, :]]
        rotation, radii = rotation.astype(np.float32), radii.astype(np.float32)
        local = [sum(rotation[i, j] * offsets[i] for i in range(3)) / radii[j] for j in range(3)]
        distance = np.sqrt(local[0] ** 2 + local[1] ** 2 + local[2] ** 2)
        unit = [q / np.maximum(distance, np.float32(1e-6)) for q in local]
        bumps = sum(a * np.sin(sum(f[j] * unit[j] for j in range(3)) + p)
                    for a, f, p in zip(amplitudes.astype(np.float32),
                                       frequencies.astype(np.float32), phases.astype(np.float32)))
        mask[box] = distance < 1.0 + bumps
        return mask


def _rotation(angles) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _lps_storage(volume: np.ndarray, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """Flip a RAS-ordered array to LPS order and return it with its (real) affine."""
    affine = np.diag([-grid.spacing[0], -grid.spacing[1], grid.spacing[2], 1.0])
    affine[:3, 3] = [grid.axes[0][-1], grid.axes[1][-1], grid.axes[2][0]]
    return np.ascontiguousarray(volume[::-1, ::-1]), affine


# ---------------------------------------------------------------------------------------------
# Abdomen (CT)
# Organ: label, centre and radii as fractions of the body's half-axes (x: right, y: anterior,
# z: half the field of view), mean HU (portal-venous phase, as in BTCV and MSD: the spleen a little
# brighter than the liver, neither separable from the other, the pancreas or the IVC by intensity
# alone under the noise). Painted in this order: later organs win overlaps. The trunk is ~66 x 50
# mm, 64 mm along z, its organs scaled up relative to it (module docstring).
_ORGANS = [
    ("liver", 6, (0.40, 0.05, 0.20), (0.45, 0.62, 0.62), 100),
    ("stomach", 7, (-0.32, 0.32, 0.30), (0.30, 0.32, 0.40), 30),
    ("spleen", 1, (-0.54, -0.28, 0.32), (0.26, 0.40, 0.50), 110),
    ("right kidney", 2, (0.40, -0.50, -0.18), (0.18, 0.26, 0.42), 165),
    ("left kidney", 3, (-0.40, -0.50, -0.30), (0.18, 0.26, 0.42), 165),
    ("pancreas", 11, (-0.08, 0.02, -0.05), (0.36, 0.11, 0.14), 90),
    ("portal and splenic veins", 10, (-0.02, 0.14, 0.10), (0.32, 0.07, 0.09), 160),
    ("gallbladder", 4, (0.30, 0.40, -0.15), (0.11, 0.14, 0.22), 10),
    ("aorta", 8, (-0.08, -0.36, 0.0), (0.09, 0.12, 1.2), 175),
    ("IVC", 9, (0.14, -0.30, 0.0), (0.09, 0.12, 1.0), 125),
    ("esophagus", 5, (-0.06, -0.28, 0.80), (0.07, 0.09, 0.35), 50),
    ("right adrenal", 12, (0.26, -0.48, 0.30), (0.07, 0.08, 0.14), 45),
    ("left adrenal", 13, (-0.24, -0.44, 0.30), (0.07, 0.08, 0.14), 45),
]
_CT_FOV = (96.0, 80.0, 64.0)


def _abdomen(rng) -> tuple[np.ndarray, dict[str, np.ndarray], _Grid]:
    """HU volume (RAS order) and a mask per organ (plus 'tumour')."""
    spacing = (rng.uniform(1.3, 1.7), rng.uniform(1.3, 1.7), rng.uniform(1.8, 2.4))
    grid = _Grid(_CT_FOV, spacing, origin=rng.uniform(-150, 150, 3))
    middle = np.array([axis.mean() for axis in grid.axes])
    half = np.array([rng.uniform(31, 35), rng.uniform(23, 27), _CT_FOV[2] / 2])
    body_center = middle + [rng.uniform(-4, 4), rng.uniform(-4, 4), 0]
    hu = np.full(grid.shape, -1000.0)
    body = grid.blob(rng, body_center, half[:2], wobble=0.05, extruded=True)
    hu[body] = rng.uniform(-110, -90)  # subcutaneous fat
    hu[grid.blob(rng, body_center, half[:2] * [0.9, 0.88], 0.04, extruded=True)] = 50  # muscle
    inside = grid.blob(rng, body_center, half[:2] * [0.8, 0.76], 0.04, extruded=True)
    hu[inside] = rng.uniform(-95, -70)  # visceral fat
    spine_center = body_center + [0, -0.62 * half[1], 0]
    hu[grid.blob(rng, spine_center, half[:2] * [0.2, 0.22], 0.03,
                 extruded=True)] = 55  # paraspinal muscle
    hu[grid.blob(rng, spine_center, half[:2] * [0.1, 0.12], 0.03,
                 extruded=True)] = rng.uniform(400, 650)  # vertebral bodies
    masks: dict[str, np.ndarray] = {}
    for name, _, position, radii, mean_hu in _ORGANS:
        center = body_center + half * (np.asarray(position) + rng.uniform(-0.05, 0.05, 3))
        size = np.maximum(half * radii * rng.uniform(0.85, 1.15, 3), 3.0)  # >= 2 voxels across
        tube = radii[2] >= 1.0
        mask = grid.blob(rng, center, size, wobble=0.05 if tube else 0.2, extruded=tube) & inside
        hu[mask] = mean_hu + rng.normal(0, 8)
        masks[name] = mask
    masks["tumour"] = _liver_tumours(rng, grid, masks["liver"], hu)
    hu += rng.normal(0, rng.uniform(8, 15), grid.shape)
    return hu, masks, grid


def _liver_tumours(rng, grid: _Grid, liver: np.ndarray, hu: np.ndarray) -> np.ndarray:
    tumours = np.zeros_like(liver)
    candidates = np.argwhere(liver)
    mean_hu = hu[liver].mean()
    for _ in range(rng.integers(1, 4)):
        index = candidates[rng.integers(len(candidates))]
        center = [grid.axes[i][index[i]] for i in range(3)]
        tumours |= grid.blob(rng, center, rng.uniform(5, 9, 3), wobble=0.25) & liver
    hu[tumours] = mean_hu - rng.uniform(40, 60)  # hypodense lesions
    return tumours


def _abdomen_case(kind: str, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    hu, masks, grid = _abdomen(rng)
    label = np.zeros(grid.shape, dtype=np.uint8)
    if kind == "btcv":
        for name, value, *_ in _ORGANS:
            label[masks[name]] = value
    elif kind == "liver":
        label[masks["liver"]] = 1
        label[masks["tumour"]] = 2
    else:
        label[masks["spleen"]] = 1
    image, affine = _lps_storage(np.round(hu).astype(np.int16), grid)
    return image, _lps_storage(label, grid)[0], affine


# ---------------------------------------------------------------------------------------------
# Brain (BraTS-like MRI)
# Relative signal of each tissue in t1, t1ce, t2, flair.
_CONTRAST = {"grey": (0.70, 0.65, 0.70, 0.75), "white": (0.90, 0.85, 0.50, 0.60),
             "csf": (0.30, 0.30, 1.30, 0.20), "edema": (0.60, 0.60, 1.10, 1.30),
             "enhancing": (0.65, 1.35, 0.90, 1.00), "necrosis": (0.35, 0.30, 1.20, 0.80)}


def _brain_case(rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # A brain of ~42 x 44 x 36 mm (scaled down like the abdomen) in a 56 x 56 x 48 mm field.
    grid = _Grid((56.0, 56.0, 48.0), (1.0, 1.0, 1.0), origin=rng.uniform(-20, 20, 3))
    middle = np.array([axis.mean() for axis in grid.axes])
    half = np.array([rng.uniform(20, 22), rng.uniform(21, 23), rng.uniform(16.5, 19.5)])
    center = middle + rng.uniform(-2, 2, 3)
    brain = grid.blob(rng, center, half, wobble=0.05, tilt_deg=5)
    white = grid.blob(rng, center, half * 0.72, wobble=0.15, tilt_deg=5) & brain
    ventricles = np.zeros_like(brain)
    for side in (-1, 1):
        ventricles |= grid.blob(rng, center + [side * 0.15 * half[0], 0.05 * half[1], 0.1 * half[2]],
                                half * [0.08, 0.3, 0.15], wobble=0.2, tilt_deg=10)
    # Tumour: in one hemisphere, nested necrosis ⊂ enhancing ⊂ edema, all inside the brain.
    side = rng.choice([-1, 1])
    tumour_center = center + half * [side * rng.uniform(0.25, 0.45), rng.uniform(-0.35, 0.35),
                                     rng.uniform(-0.3, 0.3)]
    edema_radii = rng.uniform(7, 11, 3)
    edema = grid.blob(rng, tumour_center, edema_radii, wobble=0.35) & brain
    core_center = tumour_center + rng.uniform(-2, 2, 3)
    enhancing = grid.blob(rng, core_center, edema_radii * rng.uniform(0.45, 0.7, 3), 0.25) & edema
    necrosis = (grid.blob(rng, core_center, edema_radii * rng.uniform(0.2, 0.35, 3), 0.2)
                & enhancing) if rng.random() > 0.15 else np.zeros_like(brain)
    tissue = [("grey", brain), ("white", white), ("csf", ventricles & brain), ("edema", edema),
              ("enhancing", enhancing), ("necrosis", necrosis)]
    label = np.zeros(grid.shape, dtype=np.uint8)
    label[edema], label[enhancing], label[necrosis] = 2, 4, 1
    bias = _bias_field(rng, grid)
    channels = []
    for channel in range(4):
        gain = rng.uniform(400, 900)
        signal = np.zeros(grid.shape)
        for name, mask in tissue:
            signal[mask] = _CONTRAST[name][channel] * rng.uniform(0.95, 1.05)
        signal = (signal * bias + rng.normal(0, 0.03, grid.shape)) * gain
        channels.append(np.where(brain, np.maximum(signal, 1.0), 0.0))
    image = np.round(np.stack(channels, axis=-1)).astype(np.int16)
    stored, affine = _lps_storage(image, grid)
    return stored, _lps_storage(label, grid)[0], affine


def _bias_field(rng, grid: _Grid) -> np.ndarray:
    """Smooth multiplicative intensity inhomogeneity (±~10 %), as MRI coils produce."""
    coords = np.meshgrid(*[(a - a.mean()) / 40.0 for a in grid.axes], indexing="ij")
    weights = rng.normal(0, 0.06, 3)
    return 1.0 + sum(w * c for w, c in zip(weights, coords))


# ---------------------------------------------------------------------------------------------
def generate_demo(kind: str, out_dir, num_cases: int = 10, num_test: int = 2,
                  seed: int = 0) -> Path:
    """Write demo dataset ``kind`` (brats | btcv | liver | spleen, optionally prefixed 'demo_')
    to ``out_dir`` in the canonical layout. Deterministic in (kind, num_cases, num_test, seed);
    a folder already generated with the same arguments is left as is."""
    kind = kind.removeprefix("demo_")
    if kind not in DEMO_KINDS:
        raise ValueError(f"unknown demo kind {kind!r}; use one of {DEMO_KINDS}")
    if num_cases < 1 or num_test < 0:
        raise ValueError(f"demo {kind}: num_cases must be >= 1 and num_test >= 0, "
                         f"got {num_cases} and {num_test}")
    out_dir = Path(out_dir)
    parameters = {"kind": kind, "num_cases": num_cases, "num_test": num_test, "seed": seed,
                  "version": GENERATOR_VERSION}
    index = read_json_or_none(out_dir / "dataset.json")
    if index and index.get("generator") == parameters and all(
            (out_dir / path).is_file() for path in listed_files(index)):
        return out_dir  # already generated with the same arguments
    with atomic_directory(out_dir) as temp:
        for sub in LAYOUT_DIRS:
            (temp / sub).mkdir()
        training, test = [], []
        kind_index = DEMO_KINDS.index(kind)
        for number in range(num_cases + num_test):
            rng = np.random.default_rng([seed, kind_index, number])
            image, label, affine = _brain_case(rng) if kind == "brats" else _abdomen_case(kind, rng)
            name = f"{kind}_{number + 1:03d}.nii.gz"
            if number < num_cases:
                save_nifti(image, affine, temp / "imagesTr" / name)
                save_nifti(label, affine, temp / "labelsTr" / name)
                training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
            else:
                save_nifti(image, affine, temp / "imagesTs" / name)
                test.append(f"./imagesTs/{name}")
        catalogued = get_dataset(f"demo_{kind}")  # the channels and labels drawn above
        index = make_index(
            name=f"demo_{kind}", description=f"Generated {kind}-like phantoms for the embedded "
            f"demo of hybridmim (not real patients).",
            reference="hybridmim.data.demo", licence="CC0-1.0", channels=catalogued.channels,
            labels=catalogued.labels, training=training, test=test)
        index["generator"] = parameters
        write_json(temp / "dataset.json", index)
    return out_dir
