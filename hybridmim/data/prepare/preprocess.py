"""Raw canonical layout → preprocessed cache (docs/contracts.md, "Preprocessed dataset").

Per case, with MONAI transforms: load (channels first; a 4D NIfTI or one file per channel),
check it (readable, finite, image/label grids agree, labels inside the label map), reorient to
RAS, resample to the recipe spacing (bilinear image, nearest label), crop to the foreground
bounding box, z-score MRI per channel on non-zero voxels. CT stays in HU: windows are applied by
the reader (hybridmim.data.intensity).

The output folder is published atomically and is rebuilt only when the recipe, the preprocessing
code version or the raw files changed; otherwise the call does nothing.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np

from hybridmim.data.layout import (CaseFiles, LayoutError, atomic_directory, list_cases,
                                   read_index, read_json_or_none, write_json)
from hybridmim.data.prepare.fingerprint import ForegroundSampler, describe_recipe, resolve_spacing
from hybridmim.dataset_catalog import DatasetSpec
from hybridmim.hashing import spec_hash
from hybridmim.progress import StepProgress

PREPROCESS_VERSION = 1  # bump when the code below changes what it writes, to rebuild caches
log = logging.getLogger(__name__)


class PreprocessError(ValueError):
    """A raw case cannot be preprocessed; the message names the file and what to do."""


def preprocessing_recipe(spec: DatasetSpec) -> dict:
    """The dict that decides the cache's bytes; its hash is the cache's ``recipe_hash``."""
    return {**spec.preprocess.to_dict(), "modality": spec.modality,
            "channels": list(spec.channels),
            "labels": {str(k): v for k, v in sorted(spec.labels.items())},
            "code_version": PREPROCESS_VERSION}


def preprocess_dataset(raw_dir, out_dir, spec: DatasetSpec) -> Path:
    """Build ``out_dir`` (data/processed/<dataset>) from ``raw_dir`` (canonical layout).
    Returns ``out_dir``. Raises LayoutError / PreprocessError, leaving ``out_dir`` untouched."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    index = read_index(raw_dir)
    cases = list_cases(raw_dir, index, spec.preprocess.include_unlabelled)
    if not cases:
        raise LayoutError(f"{raw_dir / 'dataset.json'}: lists no cases")
    fingerprint = raw_fingerprint(raw_dir, cases)
    # A "median" target spacing (user datasets' default) is resolved from the files' headers.
    spec, data_fingerprint = resolve_spacing(spec, [case.images[0] for case in cases])
    recipe = preprocessing_recipe(spec)
    wanted_hash = spec_hash(recipe)  # hashed like a job spec: one canonical JSON form
    if _up_to_date(out_dir, wanted_hash, fingerprint):
        log.info("%s: preprocessed cache %s is up to date (recipe %s)", spec.name, out_dir,
                 wanted_hash)
        return out_dir
    transforms = _CaseTransforms(spec)
    records = []
    with atomic_directory(out_dir) as temp:
        (temp / "cases").mkdir()
        # one line per case in logs: a case takes seconds to minutes
        progress = StepProgress(len(cases), f"preprocess {spec.name}", every_s=0, unit="case")
        for number, case in enumerate(cases, 1):
            image, label, spacing = transforms(case)
            image_rel, label_rel = f"cases/{case.case}_image.npy", f"cases/{case.case}_label.npy"
            np.save(temp / image_rel, image)
            if label is not None:
                np.save(temp / label_rel, label)
            records.append({"case": case.case, "image": image_rel,
                            "label": label_rel if label is not None else None,
                            "spacing": spacing, "shape": list(image.shape)})
            progress.update(number, case=f"{case.case} {tuple(image.shape[1:])}")
        progress.close()
        # Splits are made once per case set (splits.py) and must survive a rebuild of the voxels;
        # carrying the file over also lets make_splits refuse if the rebuild changed the cases.
        if (out_dir / "splits.json").is_file():
            shutil.copy2(out_dir / "splits.json", temp / "splits.json")
        description = {key: value for key, value in index.items()
                       if key not in ("training", "test")}
        data_fingerprint.update(transforms.foreground.summary())
        log.info("%s", describe_recipe(spec.name, recipe, data_fingerprint))
        description.update({"dataset": spec.name, "labels": recipe["labels"],
                            "channels": list(spec.channels), "recipe": recipe,
                            "fingerprint": data_fingerprint,
                            "recipe_hash": wanted_hash, "raw_fingerprint": fingerprint,
                            "cases": records})
        write_json(temp / "dataset.json", description)
    return out_dir


def raw_fingerprint(raw_dir: Path, cases: list[CaseFiles]) -> str:
    """Cheap content identity of the raw inputs, the same on every machine (it is stored in the
    versioned cache): dataset.json's bytes, and per case file its name, size and, for .gz, the
    gzip trailer (CRC-32 and length of the whole uncompressed content, the last 8 bytes), so a
    no-op check never reads tens of GB. Uncompressed files are hashed in full."""
    digest = hashlib.sha256((Path(raw_dir) / "dataset.json").read_bytes())
    for case in cases:
        for path in (*case.images, *([case.label] if case.label else [])):
            size = path.stat().st_size
            with open(path, "rb") as handle:
                if path.suffix == ".gz" and size >= 18:  # 10-byte header + 8-byte trailer
                    handle.seek(size - 8)
                    content = handle.read(8).hex()
                else:
                    content = hashlib.file_digest(handle, "sha256").hexdigest()
            digest.update(f"{case.case}|{path.name}|{size}|{content}\n".encode())
    return digest.hexdigest()


def _up_to_date(out_dir: Path, wanted_hash: str, fingerprint: str) -> bool:
    index = read_json_or_none(out_dir / "dataset.json")
    if index is None:
        return False
    if index.get("recipe_hash") != wanted_hash or index.get("raw_fingerprint") != fingerprint:
        log.info("%s: recipe or raw data changed, rebuilding", out_dir)
        return False
    files = [c["image"] for c in index["cases"]] + [c["label"] for c in index["cases"] if c["label"]]
    return all((out_dir / f).is_file() for f in files)


class _CaseTransforms:
    """Load + check + MONAI spatial/intensity transforms for one case."""

    def __init__(self, spec: DatasetSpec):
        from monai.transforms import (Compose, CropForegroundd, LoadImage, NormalizeIntensityd,
                                      Orientationd, Spacingd)
        recipe = spec.preprocess
        self.spec = spec
        self.foreground = ForegroundSampler()
        self.threshold = threshold = recipe.foreground_threshold
        self.loader = LoadImage(image_only=True, ensure_channel_first=True, reader="NibabelReader")

        # An unlabelled case has no "label" key: the transforms skip it (allow_missing_keys).
        keys = ["image", "label"]
        # Explicit axis labels: NIfTI world space is RAS+, whatever MONAI's default becomes.
        resample = [Orientationd(keys=keys, axcodes=recipe.orientation,
                                 labels=(("L", "R"), ("P", "A"), ("I", "S")),
                                 allow_missing_keys=True)]
        if recipe.spacing is not None:
            resample.append(Spacingd(keys=keys, pixdim=recipe.spacing,
                                     mode=["bilinear", "nearest"], allow_missing_keys=True))
        crop = [CropForegroundd(keys=keys, source_key="image", select_fn=lambda x: x > threshold,
                                allow_smaller=True, allow_missing_keys=True)
                ] if recipe.crop_foreground else []
        if recipe.normalize == "zscore_nonzero_channelwise":
            crop.append(NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True))
        self.resample, self.crop = Compose(resample), Compose(crop)

    def _load(self, paths):
        names = ", ".join(str(p) for p in paths)
        try:
            data = self.loader([str(p) for p in paths] if len(paths) > 1 else str(paths[0]))
        except Exception as error:  # nibabel/MONAI raise many types for a broken file
            raise PreprocessError(f"{names}: cannot be read as NIfTI ({type(error).__name__}: "
                                  f"{error}); re-download or re-convert this case") from None
        if data.ndim != 4:
            raise PreprocessError(f"{names}: expected a 3D volume (or 4D with channels last), got "
                                  f"array shape {tuple(data.shape)} after adding the channel axis")
        bad = int((~np.isfinite(data.numpy())).sum())
        if bad:
            raise PreprocessError(f"{names}: {bad} voxel(s) are NaN or infinite; fix or drop this "
                                  f"case in the raw dataset")
        return data

    def __call__(self, case: CaseFiles):
        image = self._load(case.images)
        if image.shape[0] != self.spec.num_channels:
            raise PreprocessError(f"{case.images[0]}: has {image.shape[0]} channel(s), dataset "
                                  f"{self.spec.name!r} expects {list(self.spec.channels)}")
        if not bool((image > self.threshold).any()):
            raise PreprocessError(f"{case.images[0]}: no voxel above the foreground threshold "
                                  f"{self.threshold} (empty or wrongly scaled image); check the "
                                  f"file or the dataset's foreground_threshold")
        data = {"image": image}
        labelled = case.label is not None
        if labelled:
            label = self._load((case.label,))
            self._check_label(case, image, label)
            data["label"] = label
        data = self.resample(data)
        if labelled:
            labelled_voxels = int((data["label"] > 0).sum())
            self.foreground.add(data["image"].numpy(), data["label"].numpy())
        out = self.crop(data)
        affine = np.asarray(out["image"].affine, dtype=float)
        spacing = [round(float(s), 6) for s in np.linalg.norm(affine[:3, :3], axis=0)]
        image_array = out["image"].numpy().astype(np.float32)
        label_array = None
        if labelled:
            label_array = np.rint(out["label"].numpy()[0]).astype(np.uint8)
            lost = labelled_voxels - int((label_array > 0).sum())
            if lost:  # labels reaching into "air" would be silently cut: say so
                log.warning("%s: the foreground crop (threshold %s) removed %d labelled voxel(s) "
                            "of %d", case.label, self.threshold, lost, labelled_voxels)
        return image_array, label_array, spacing

    def _check_label(self, case: CaseFiles, image, label) -> None:
        if label.shape[0] != 1:
            raise PreprocessError(f"{case.label}: a label map must be one 3D volume, got "
                                  f"{label.shape[0]} channels")
        if tuple(label.shape[1:]) != tuple(image.shape[1:]):
            raise PreprocessError(f"{case.label}: shape {tuple(label.shape[1:])} differs from its "
                                  f"image {case.images[0]} {tuple(image.shape[1:])}; image and "
                                  f"label must share one voxel grid")
        if not np.allclose(np.asarray(label.affine), np.asarray(image.affine), atol=1e-3):
            raise PreprocessError(f"{case.label}: affine differs from its image {case.images[0]}; "
                                  f"image and label must share one voxel grid (re-convert, or "
                                  f"resample the label onto the image)")
        values = np.unique(label.numpy())
        unknown = [v for v in values.tolist() if v not in self.spec.labels]
        if unknown:
            raise PreprocessError(f"{case.label}: label value(s) {unknown[:10]} are not in the "
                                  f"label map of {self.spec.name!r} {sorted(self.spec.labels)}; "
                                  f"relabel the file or extend 'labels'")
