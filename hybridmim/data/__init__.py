"""Datasets: registry, canonical layout, embedded demo, preprocessing, splits, intensity windows
and torch datasets over the preprocessed cache.

Names are exported lazily: the Snakefile imports the registry (through hybridmim.config) on
every parse, and that must not pay for torch or MONAI. MONAI is imported only where transforms
run."""

from importlib import import_module

_EXPORTS = {
    "demo": ("DEMO_KINDS", "generate_demo"),
    "intensity": ("apply_window", "validate_window"),
    "layout": ("LayoutError", "atomic_directory", "read_index", "save_nifti"),
    "loading": ("PretrainCropDataset", "SegmentationDataset", "brats_regions",
                "labels_to_regions"),
    "preprocess": ("PreprocessError", "preprocess_dataset", "read_processed_index",
                   "recipe_hash"),
    "registry": ("REGISTRY", "DatasetConfigError", "DatasetSpec", "PreprocessRecipe",
                 "SplitRecipe", "dataset_from_config", "get_dataset"),
    "splits": ("SplitError", "label_fraction_subset", "load_splits", "make_splits",
               "pretraining_cases"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'hybridmim.data' has no attribute {name!r}")
    return getattr(import_module(f"hybridmim.data.{_MODULE_OF[name]}"), name)
