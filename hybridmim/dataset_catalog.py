"""What every dataset is: modality, channels, labels, how to preprocess and split it, where it
comes from.

A ``DatasetSpec`` is everything downstream of the canonical MSD layout needs (preprocess, splits,
loading, evaluation); the ``source`` dict is what the steps before it (download / extract /
convert, or the demo generator) need. Source kinds:

- ``{"kind": "generated", "generator": "brats"|"btcv"|"liver"|"spleen"}`` — the embedded demo.
- ``{"kind": "url", "url", "md5", "archive", "archive_root"}`` — public archive (MSD tasks);
  ``archive_root`` is the folder inside it that already has the canonical layout.
- ``{"kind": "manual", "archive", "md5", "instructions", "converter"}`` — data behind a
  registration; the user puts the archive in place, ``converter`` names the function that turns
  it into the canonical layout. How to get BTCV and BraTS 2020 (and the Synapse download) is
  told by ``hybridmim.data.sources.acquire.MANUAL_SOURCES``; ``instructions`` is for a manual
  source declared in config.
- ``{"kind": "folder", "path"}`` — a folder that already has the canonical layout (a user's own
  data, declared in config by ``dataset_from_config`` with no code change).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from hybridmim.spec_schemas import schema_problem

# Intensity windows: plain JSON dicts that travel inside job specs; hybridmim.data.intensity
# documents the kinds and applies them, job_common.schema.yaml ($defs/window) lists their keys.
WINDOW_KINDS = ("ct", "mri_pretrain", "identity", "ct_foreground")
CT_FOREGROUND_WINDOW = {"kind": "ct_foreground", "b_min": 0.0, "b_max": 1.0, "clip": True}

CT_FINETUNE_WINDOW = {"kind": "ct", "a_min": -175.0, "a_max": 250.0, "b_min": 0.0, "b_max": 1.0,
                      "clip": True}
CT_PRETRAIN_WINDOW = {"kind": "ct", "a_min": -1000.0, "a_max": 1000.0, "b_min": 0.001,
                      "b_max": 1.0, "clip": True}
MRI_FINETUNE_WINDOW = {"kind": "identity"}
MRI_PRETRAIN_WINDOW = {"kind": "mri_pretrain", "z_min": -3.0, "z_max": 3.0, "b_min": 0.001,
                       "b_max": 1.0}


def validate_window(window: Any, where: str = "window") -> dict:
    """Return a checked copy of ``window`` (its bounds as floats); raise ValueError naming
    ``where`` and the bad key."""
    problem = schema_problem(window, "job_common#/$defs/window")
    if problem:
        raise ValueError(f"{where}: {problem}")
    kind = window["kind"]
    checked = {key: value if key in ("kind", "clip") else float(value)
               for key, value in window.items()}
    low, high = {"ct": ("a_min", "a_max"), "mri_pretrain": ("z_min", "z_max")}.get(kind, (None, None))
    if low and checked[low] >= checked[high]:
        raise ValueError(f"{where}: {low} ({checked[low]}) must be below {high} ({checked[high]})")
    return checked


MODALITIES = ("CT", "MRI")
MEDIAN_SPACING = "median"
SPLIT_NAMES = ("train", "val", "test")


class DatasetConfigError(ValueError):
    """A dataset name, registry entry or config block is wrong; the message says which and how to
    fix it."""


@dataclass(frozen=True)
class PreprocessRecipe:
    """Everything that decides the bytes of the preprocessed cache (and hence its recipe hash).
    Intensity windows are NOT here: they are applied when reading, so changing one never forces a
    rebuild."""
    # Target voxel size in mm (x, y, z); None = keep each case's own; "median" = the dataset's
    # median spacing, resolved by the preprocess step from its fingerprint (user datasets).
    spacing: tuple[float, float, float] | str | None
    normalize: str  # "none" (CT keeps HU) or "zscore_nonzero_channelwise" (MRI)
    # A voxel whose value is above this in any channel is foreground for the bounding-box crop.
    # CT: -175 HU, the bottom of the fine-tuning window, which is where MONAI's recipe crops
    # (it crops after windowing, on > 0); MRI: 0, skull-stripped background is exactly 0.
    foreground_threshold: float
    orientation: str = "RAS"
    include_unlabelled: bool = False  # also cache imagesTs (never part of any split)
    crop_foreground: bool = True  # False: whole volumes (the native pretraining cache)

    def to_dict(self) -> dict:
        recipe = {"orientation": self.orientation,
                  "spacing": (list(self.spacing) if isinstance(self.spacing, tuple)
                              else self.spacing),
                  "normalize": self.normalize, "foreground_threshold": self.foreground_threshold,
                  "include_unlabelled": self.include_unlabelled}
        if not self.crop_foreground:  # only then: existing caches keep their recipe hash
            recipe["crop_foreground"] = False
        return recipe


@dataclass(frozen=True)
class SplitRecipe:
    """How labelled cases are divided. ``fraction``: seeded shuffle cut by ``fractions``
    (train, val, test). ``fixed``: published lists of case ids (BTCV). ``val_is_test`` marks the
    protocol of MONAI's BTCV/MSD references, where the validation cases used for model selection
    are also the ones reported: then val is set equal to test, and this is recorded in
    splits.json."""
    kind: str
    name: str
    fractions: tuple[float, float, float] | None = None
    seed: int = 0
    fixed: Mapping[str, tuple[str, ...]] | None = None
    val_is_test: bool = False

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{self.name}"
        train, val, test = self.fractions
        suffix = ",val_is_test" if self.val_is_test else ""
        return f"fraction:{train:g}/{val:g}/{test:g}{suffix}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "seed": self.seed,
                "fractions": list(self.fractions) if self.fractions else None,
                "fixed": {k: list(v) for k, v in self.fixed.items()} if self.fixed else None,
                "val_is_test": self.val_is_test}


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    modality: str
    channels: tuple[str, ...]
    labels: Mapping[int, str]  # label value -> name, 0 = background
    preprocess: PreprocessRecipe
    split: SplitRecipe
    source: Mapping[str, Any]
    windows: Mapping[str, dict]  # {"finetune": window, "pretrain": window}
    regions: Mapping[str, tuple[int, ...]] | None = None  # evaluation regions (BraTS TC/WT/ET)
    split_variants: Mapping[str, SplitRecipe] = field(default_factory=dict)
    description: str = ""

    @property
    def num_channels(self) -> int:
        return len(self.channels)

    @property
    def num_classes(self) -> int:
        """Output channels of a segmentation network: one per region (sigmoid), else one per
        label including background (softmax)."""
        return len(self.regions) if self.regions else len(self.labels)

    def to_dict(self) -> dict:
        """JSON form, as finetune/evaluate specs carry it (label keys become strings)."""
        return {"name": self.name, "modality": self.modality, "channels": list(self.channels),
                "labels": {str(k): v for k, v in sorted(self.labels.items())},
                "regions": {k: list(v) for k, v in self.regions.items()} if self.regions else None,
                "preprocess": self.preprocess.to_dict(), "split": self.split.to_dict(),
                "windows": {k: dict(v) for k, v in self.windows.items()},
                "source": dict(self.source), "description": self.description}


# ---------------------------------------------------------------------------------------------
# Built-in entries
_MSD_URL = "https://msd-for-monai.s3-us-west-2.amazonaws.com/{task}.tar"
_CT_WINDOWS = {"finetune": CT_FINETUNE_WINDOW, "pretrain": CT_PRETRAIN_WINDOW}
_MRI_WINDOWS = {"finetune": MRI_FINETUNE_WINDOW, "pretrain": MRI_PRETRAIN_WINDOW}
_CT_RECIPE = PreprocessRecipe(spacing=(1.5, 1.5, 2.0), normalize="none", foreground_threshold=-175.0)
_MRI_RECIPE = PreprocessRecipe(spacing=(1.0, 1.0, 1.0), normalize="zscore_nonzero_channelwise",
                               foreground_threshold=0.0)

BRATS_LABELS = {0: "background", 1: "NCR/NET", 2: "ED", 4: "ET"}
BRATS_REGIONS = {"TC": (1, 4), "WT": (1, 2, 4), "ET": (4,)}
BTCV_LABELS = {0: "background", 1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder",
               5: "esophagus", 6: "liver", 7: "stomach", 8: "aorta", 9: "IVC",
               10: "portal and splenic veins", 11: "pancreas", 12: "right adrenal",
               13: "left adrenal"}
LIVER_LABELS = {0: "background", 1: "liver", 2: "tumour"}
SPLEEN_LABELS = {0: "background", 1: "spleen"}


def _btcv_ids(numbers) -> tuple[str, ...]:
    # Case ids are image file names without .nii.gz; the BTCV converter must keep the archive's
    # names (img0001.nii.gz ...), which is also what MONAI's and TransUNet's lists refer to.
    return tuple(f"img{n:04d}" for n in numbers)


_BTCV_LABELLED = list(range(1, 11)) + list(range(21, 41))  # the 30 cases with public labels
_BTCV_MONAI_VAL = _btcv_ids(range(35, 41))  # MONAI research-contributions dataset_0.json
_BTCV_TRANSUNET_TEST = _btcv_ids([1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38])  # test_vol.txt
BTCV_SPLITS = {
    "monai": SplitRecipe(kind="fixed", name="monai", val_is_test=True, fixed={
        "train": tuple(c for c in _btcv_ids(_BTCV_LABELLED) if c not in _BTCV_MONAI_VAL),
        "val": _BTCV_MONAI_VAL, "test": _BTCV_MONAI_VAL}),
    "transunet": SplitRecipe(kind="fixed", name="transunet", val_is_test=True, fixed={
        "train": tuple(c for c in _btcv_ids(_BTCV_LABELLED) if c not in _BTCV_TRANSUNET_TEST),
        "val": _BTCV_TRANSUNET_TEST, "test": _BTCV_TRANSUNET_TEST}),
}
_MSD_SPLIT = SplitRecipe(kind="fraction", name="msd_80_20", fractions=(0.8, 0.0, 0.2), seed=0,
                         val_is_test=True)
_DEMO_SPLIT = SplitRecipe(kind="fraction", name="demo", fractions=(0.6, 0.2, 0.2), seed=0)


def _demo(name: str, generator: str, modality: str, channels, labels, regions=None) -> DatasetSpec:
    recipe = _MRI_RECIPE if modality == "MRI" else _CT_RECIPE
    return DatasetSpec(
        name=name, modality=modality, channels=tuple(channels), labels=labels, regions=regions,
        preprocess=recipe, split=_DEMO_SPLIT, windows=_MRI_WINDOWS if modality == "MRI" else
        _CT_WINDOWS, source={"kind": "generated", "generator": generator},
        description=f"Embedded demo: generated {generator}-like phantoms (hybridmim.data.demo)")



def _msd(name: str, task: str, md5: str, labels, labelled_cases: int) -> DatasetSpec:
    """A Decathlon CT task: the archive ``<task>.tar`` holds the canonical layout in ``<task>/``."""
    return DatasetSpec(
        name=name, modality="CT", channels=("CT",), labels=labels, preprocess=_CT_RECIPE,
        windows=_CT_WINDOWS, split=_MSD_SPLIT,
        source={"kind": "url", "url": _MSD_URL.format(task=task), "md5": md5,
                "archive": f"{task}.tar", "archive_root": task},
        description=f"Medical Segmentation Decathlon {task.replace('_', ' ')}: {labelled_cases} "
                    f"labelled CT volumes")

REGISTRY: dict[str, DatasetSpec] = {spec.name: spec for spec in [
    DatasetSpec(
        name="brats2020", modality="MRI", channels=("t1", "t1ce", "t2", "flair"),
        labels=BRATS_LABELS, regions=BRATS_REGIONS, preprocess=_MRI_RECIPE, windows=_MRI_WINDOWS,
        split=SplitRecipe(kind="fraction", name="brats_70_10_20", fractions=(0.7, 0.1, 0.2),
                          seed=0),
        source={"kind": "manual", "archive": "MICCAI_BraTS2020_TrainingData.zip", "md5": None,
                "converter": "brats2020"},
        description="BraTS 2020 training set: 369 glioma cases, 4 MRI sequences"),
    DatasetSpec(
        name="btcv", modality="CT", channels=("CT",), labels=BTCV_LABELS, preprocess=_CT_RECIPE,
        windows=_CT_WINDOWS, split=BTCV_SPLITS["monai"], split_variants=BTCV_SPLITS,
        source={"kind": "manual", "archive": "RawData.zip", "md5": None, "converter": "btcv"},
        description="BTCV abdomen: 30 labelled CT volumes, 13 organs"),
    _msd("msd_liver", "Task03_Liver", "a90ec6c4aa7f6a3d087205e23d4e6397", LIVER_LABELS, 131),
    _msd("msd_spleen", "Task09_Spleen", "410d4a301da4e5b2f6f86ec3ddba524e", SPLEEN_LABELS, 41),
    _demo("demo_brats", "brats", "MRI", ("t1", "t1ce", "t2", "flair"), BRATS_LABELS,
          BRATS_REGIONS),
    _demo("demo_btcv", "btcv", "CT", ("CT",), BTCV_LABELS),
    _demo("demo_liver", "liver", "CT", ("CT",), LIVER_LABELS),
    _demo("demo_spleen", "spleen", "CT", ("CT",), SPLEEN_LABELS),
]}


# ---------------------------------------------------------------------------------------------
# Lookup and config blocks
BLOCK_KEYS = {"modality", "channels", "labels", "regions", "folder", "source", "spacing",
              "normalize", "foreground_threshold", "include_unlabelled", "split", "windows",
              "description"}
# Keys of a config block that steer acquisition/generation, not the dataset's definition.
ACQUISITION_KEYS = {"registry", "num_cases", "num_test", "seed", "manual_path"}
CONFIG_BLOCK_KEYS = BLOCK_KEYS | ACQUISITION_KEYS


def get_dataset(name: str) -> DatasetSpec:
    if name not in REGISTRY:
        raise DatasetConfigError(
            f"unknown dataset {name!r}: built-in datasets are {sorted(REGISTRY)}; declare your own "
            f"with a config block (modality, labels, folder) read by dataset_from_config")
    return REGISTRY[name]


def dataset_from_config(name: str, block: Mapping[str, Any]) -> DatasetSpec:
    """A dataset declared entirely in config. Required: ``modality``, ``labels`` ({value: name},
    with 0 = background) and ``folder`` (canonical MSD layout) or ``source``. A block whose name
    is a registry entry overrides that entry instead."""
    if name in REGISTRY:
        return _apply_block(REGISTRY[name], name, block) if block else REGISTRY[name]
    _check_keys(name, block)
    missing = [key for key in ("modality", "labels") if key not in block]
    if "folder" not in block and "source" not in block:
        missing.append("folder")
    if missing:
        raise DatasetConfigError(
            f"dataset {name!r}: config block lacks {missing}; a dataset of your own needs "
            f"'modality' (CT or MRI), 'labels' ({{0: background, 1: ...}}) and 'folder' (a folder "
            f"with imagesTr/, labelsTr/ and dataset.json in the MSD layout)")
    modality = _modality(name, block["modality"])
    # One channel unless the block lists them: a multi-channel dataset must name its channels in
    # the order of the image files (the integrity check refuses a dataset.json that disagrees).
    recipe = dataclasses.replace(_MRI_RECIPE if modality == "MRI" else _CT_RECIPE,
                                 spacing=MEDIAN_SPACING)
    # CT fine-tuning clips to the dataset's own foreground intensities (its fingerprint), not to
    # the abdominal window of the built-in CT datasets.
    windows = _MRI_WINDOWS if modality == "MRI" else {**_CT_WINDOWS,
                                                      "finetune": CT_FOREGROUND_WINDOW}
    base = DatasetSpec(
        name=name, modality=modality, channels=(modality,), labels={0: "background"},
        preprocess=recipe,
        split=SplitRecipe(kind="fraction", name="config", fractions=(0.7, 0.1, 0.2), seed=0),
        source={}, windows=windows,
        description=f"user dataset {name}")
    return _apply_block(base, name, {k: v for k, v in block.items() if k != "modality"})


def _check_keys(name: str, block: Mapping[str, Any]) -> None:
    """Refuse unknown keys naming the closest valid one: "unknown key 'lables' (did you mean
    'labels'?)"."""
    import difflib

    unknown = sorted(map(str, set(block) - CONFIG_BLOCK_KEYS))
    if not unknown:
        return
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(CONFIG_BLOCK_KEYS), n=1, cutoff=0.6)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise DatasetConfigError(f"datasets.{name}: unknown key{'s' if len(parts) > 1 else ''} "
                             f"{', '.join(parts)}; allowed keys are {sorted(CONFIG_BLOCK_KEYS)}")


def _apply_block(spec: DatasetSpec, name: str, block: Mapping[str, Any]) -> DatasetSpec:
    """``spec`` changed by a config block. Types and forms of its keys are in the config schema's
    definitions.dataset, checked here too for blocks that come through the Python API."""
    _check_keys(name, block)
    problem = schema_problem(dict(block), "config#/definitions/dataset", f"datasets.{name}")
    if problem:
        raise DatasetConfigError(problem)
    changes: dict[str, Any] = {}
    # The schema has checked the type of each key: a string or boolean is taken as it is.
    recipe_changes = {key: block[key] for key in ("normalize", "include_unlabelled")
                      if key in block}
    if "modality" in block:
        changes["modality"] = _modality(name, block["modality"])
    if "channels" in block:
        changes["channels"] = tuple(block["channels"])
    if "labels" in block:
        changes["labels"] = _labels(name, block["labels"])
    if "regions" in block:
        changes["regions"] = _regions(name, block["regions"],
                                      changes.get("labels", spec.labels))
    if "folder" in block:
        changes["source"] = {"kind": "folder", "path": str(block["folder"])}
    if "source" in block:
        changes["source"] = dict(block["source"])
    if "spacing" in block:
        spacing = block["spacing"]
        recipe_changes["spacing"] = (spacing if spacing == MEDIAN_SPACING else
                                     tuple(float(s) for s in spacing) if spacing else None)
    if "foreground_threshold" in block:
        recipe_changes["foreground_threshold"] = float(block["foreground_threshold"])
    if recipe_changes:
        changes["preprocess"] = dataclasses.replace(spec.preprocess, **recipe_changes)
    if "split" in block:
        changes["split"] = _split(name, block["split"], spec)
    if "windows" in block:
        windows = dict(spec.windows)
        for stage, window in dict(block["windows"]).items():
            try:
                windows[stage] = validate_window(window, f"dataset {name!r} windows.{stage}")
            except ValueError as error:
                raise DatasetConfigError(str(error)) from None
        changes["windows"] = windows
    if "description" in block:
        changes["description"] = block["description"]
    return dataclasses.replace(spec, **changes)


def _modality(name: str, value: Any) -> str:
    modality = str(value).upper()
    if modality not in MODALITIES:
        raise DatasetConfigError(f"dataset {name!r}: modality must be CT or MRI, got {value!r}")
    return modality


def _labels(name: str, value: Any) -> dict[int, str]:
    labels: dict[int, str] = {}
    for key, label_name in value.items():
        try:
            label = int(key)
        except (TypeError, ValueError):
            raise DatasetConfigError(f"dataset {name!r}: label value {key!r} is not an "
                                     f"integer") from None
        if not 0 <= label <= 255 or str(label) != str(key).strip():
            raise DatasetConfigError(f"dataset {name!r}: label value {key!r} must be an integer "
                                     f"in 0..255 (labels are stored as uint8)")
        labels[label] = str(label_name)
    if 0 not in labels:
        raise DatasetConfigError(f"dataset {name!r}: 'labels' must include 0 (background)")
    return dict(sorted(labels.items()))


def _regions(name: str, value: Any, labels: Mapping[int, str]):
    if value is None:
        return None
    regions = {}
    for region, members in dict(value).items():
        members = tuple(members)
        bad = [m for m in members if m not in labels or m == 0]
        if bad:
            raise DatasetConfigError(f"dataset {name!r}: region {region!r} must list foreground "
                                     f"label values of {sorted(labels)}; bad: {bad}")
        regions[str(region)] = members
    return regions


def _split(name: str, value: Any, spec: DatasetSpec) -> SplitRecipe:
    where = f"dataset {name!r} split"
    if isinstance(value, str):
        if value in spec.split_variants:
            return spec.split_variants[value]
        raise DatasetConfigError(f"{where}: unknown split {value!r}; this dataset has "
                                 f"{sorted(spec.split_variants) or 'no named splits'}; or give a "
                                 f"dict with kind: fraction|fixed")
    # The schema has checked the keys: kind fraction (the default) with three fractions, or
    # fixed with lists of case ids.
    common = {"kind": value.get("kind", "fraction"), "name": value.get("name", "config"),
              "seed": int(value.get("seed", spec.split.seed)),
              "val_is_test": value.get("val_is_test", False)}
    if common["kind"] == "fixed":
        return SplitRecipe(**common, fixed={k: tuple(str(c) for c in value.get(k, ()))
                                            for k in SPLIT_NAMES})
    fractions = tuple(float(value[k]) for k in SPLIT_NAMES)
    if abs(sum(fractions) - 1.0) > 1e-6 or fractions[0] <= 0:
        raise DatasetConfigError(f"{where}: fractions {fractions} must be >= 0, sum to 1 and "
                                 f"give train a positive share")
    return SplitRecipe(**common, fractions=fractions)
