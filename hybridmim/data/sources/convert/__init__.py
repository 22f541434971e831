"""Source → canonical layout (``imagesTr/ labelsTr/ imagesTs/ dataset.json``, see data/layout.py).

One converter per source kind, named by the catalogue's ``converter`` key: ``msd`` and ``folder``
(msd.py), ``btcv`` (btcv.py), ``brats2020`` (brats.py); common.py holds what they share.

Every converter builds the dataset in a temporary sibling of ``out_dir`` and renames it into
place only after the ``verify`` callback (acquire passes the integrity check) accepted the
temporary folder. Unchanged NIfTI files are hard-linked from the extracted source instead of
copied (MSD Liver is ~28 GB), with a copy as fallback across file systems.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from hybridmim.data.sources.convert.brats import convert_brats
from hybridmim.data.sources.convert.btcv import convert_btcv
from hybridmim.data.sources.convert.common import ConversionError, Verify
from hybridmim.data.sources.convert.msd import convert_folder, convert_msd

__all__ = ["ConversionError", "Verify", "convert_brats", "convert_btcv", "convert_folder",
           "convert_msd", "get_converter"]

CONVERTERS: dict[str, Callable[..., Path]] = {"msd": convert_msd, "btcv": convert_btcv,
                                              "brats2020": convert_brats, "folder": convert_folder}


def get_converter(name: str) -> Callable[..., Path]:
    if name not in CONVERTERS:
        raise ConversionError(f"unknown converter {name!r}; known: {sorted(CONVERTERS)}")
    return CONVERTERS[name]
