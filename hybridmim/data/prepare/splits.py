"""Train/val/test splits, made once per preprocessed dataset and versioned with it.

``splits.json`` (docs/contracts.md): ``{"seed", "recipe", "train", "val", "test"}`` plus
``dataset``, ``cases_sha256`` (the labelled case set it was made for), ``val_is_test`` and
``unassigned`` (labelled cases a fixed list does not mention). Once written it is never changed:
a re-run with the same case set and recipe returns it, anything else is an error, because a
silently re-drawn test set would make earlier results incomparable.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from hybridmim.atomic import write_json
from hybridmim.data.layout import read_processed_index
from hybridmim.dataset_catalog import DatasetSpec, SplitRecipe

SPLITS_FILE = "splits.json"


class SplitError(ValueError):
    """Splits cannot be made or do not match the data; the message says what to do."""


def make_splits(processed_dir, spec: DatasetSpec, seed: int | None = None) -> dict:
    """Write ``<processed_dir>/splits.json`` from ``spec.split`` (``seed`` overrides the recipe's
    seed) unless an identical one exists; return the splits."""
    processed_dir = Path(processed_dir)
    index = read_processed_index(processed_dir)
    labelled = sorted(c["case"] for c in index["cases"] if c["label"] is not None)
    recipe = spec.split
    seed = recipe.seed if seed is None else int(seed)
    cases_sha256 = hashlib.sha256("\n".join(labelled).encode()).hexdigest()
    path = processed_dir / SPLITS_FILE
    if path.exists():
        existing = load_splits(processed_dir)
        if existing.get("cases_sha256") != cases_sha256:
            known = set(existing["train"]) | set(existing["val"]) | set(existing["test"]) | set(
                existing.get("unassigned", []))
            raise SplitError(
                f"{path}: was made for a different set of labelled cases (new: "
                f"{sorted(set(labelled) - known)[:5]}, gone: {sorted(known - set(labelled))[:5]}); "
                f"splits are made once so results stay comparable. If the data change is "
                f"intended, delete {path} and re-run to draw new splits.")
        if (existing.get("recipe"), existing.get("seed")) != (recipe.describe(), seed):
            raise SplitError(
                f"{path}: was made with recipe {existing.get('recipe')!r} seed "
                f"{existing.get('seed')}, now asked for {recipe.describe()!r} seed {seed}; delete "
                f"it to re-split deliberately, or use the original split settings.")
        return existing
    splits = {"dataset": spec.name, "seed": seed, "recipe": recipe.describe(),
              "cases_sha256": cases_sha256, "val_is_test": recipe.val_is_test,
              **_assign(labelled, recipe, seed, processed_dir)}
    write_json(path, splits, sort_keys=False)
    return splits


def load_splits(processed_dir) -> dict:
    path = Path(processed_dir) / SPLITS_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SplitError(f"{path}: missing; run make_splits for this dataset first") from None


def pretraining_cases(processed_dirs) -> dict[str, list[str]]:
    """Training case ids of each preprocessed dataset: a pretraining corpus never contains a
    validation or test case of a downstream dataset."""
    corpus = {}
    for processed_dir in processed_dirs:
        splits = load_splits(processed_dir)
        held_out = set(splits["val"]) | set(splits["test"])
        leaked = held_out & set(splits["train"])
        if leaked:  # only a hand-edited file can get here; refuse rather than leak
            raise SplitError(f"{Path(processed_dir) / SPLITS_FILE}: cases {sorted(leaked)[:5]} are "
                             f"both train and val/test")
        corpus[str(processed_dir)] = list(splits["train"])
    return corpus


def label_fraction_subset(ids, fraction: float, seed: int) -> list[str]:
    """A seeded subset of ``ids`` holding ``fraction`` of them (at least one case). Subsets are
    nested: for one seed, the 10 % cases are inside the 25 % cases and so on, so a
    label-efficiency curve varies only the amount of labels."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    ordered = sorted(ids)
    if not ordered:
        raise ValueError("label_fraction_subset: no cases to choose from")
    permutation = np.random.default_rng(seed).permutation(len(ordered))
    keep = max(1, int(round(fraction * len(ordered))))
    return sorted(ordered[i] for i in permutation[:keep])


def _assign(cases: list[str], recipe: SplitRecipe, seed: int, where: Path) -> dict:
    if not cases:
        raise SplitError(f"{where}: no labelled cases to split")
    if recipe.kind == "fixed":
        lists = {name: sorted(recipe.fixed.get(name, ())) for name in ("train", "val", "test")}
        if recipe.val_is_test:
            lists["val"] = list(lists["test"])
        listed = set().union(*lists.values())
        missing = sorted(listed - set(cases))
        if missing:
            raise SplitError(f"{where}: split {recipe.name!r} lists cases the preprocessed "
                             f"dataset lacks: {missing[:10]}; check that conversion kept the "
                             f"original file names and that no case was dropped")
        overlap = set(lists["train"]) & (set(lists["val"]) | set(lists["test"]))
        if overlap:
            raise SplitError(f"split {recipe.name!r}: cases {sorted(overlap)} are both in train "
                             f"and in val/test")
        return {**lists, "unassigned": sorted(set(cases) - listed)}
    train_share, val_share, test_share = recipe.fractions
    if recipe.val_is_test and val_share > 0:
        raise SplitError(f"split {recipe.name!r}: val_is_test needs a val fraction of 0, got "
                         f"{val_share}")
    order = [cases[i] for i in np.random.default_rng(seed).permutation(len(cases))]
    counts = [_share(test_share, len(cases)), _share(val_share, len(cases))]
    if len(cases) - sum(counts) < 1:
        raise SplitError(f"{where}: {len(cases)} labelled case(s) are too few for fractions "
                         f"{recipe.fractions}; add cases or change the split fractions")
    test, val = order[: counts[0]], order[counts[0]: counts[0] + counts[1]]
    train = order[counts[0] + counts[1]:]
    if recipe.val_is_test:
        val = list(test)
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test), "unassigned": []}


def _share(fraction: float, total: int) -> int:
    """Cases for a split of ``fraction``: rounded, but at least one when the fraction is not 0."""
    return 0 if fraction <= 0 else max(1, int(round(fraction * total)))
