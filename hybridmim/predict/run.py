"""`hybridmim predict`: segment NIfTI images with a trained model, one label map per input.

Inputs: one NIfTI file or a folder of them. A multi-channel model (BraTS) takes either one 4D
file per case (channels last, as the canonical layout stores it) or one 3D file per channel
named ``<case>_<channel>.nii[.gz]`` with the dataset's channel names (``BraTS20_001_t1.nii.gz``,
``..._t1ce``, ``..._t2``, ``..._flair``, as BraTS distributes them). Every input is checked
before the first one is segmented, so a bad file stops the command before any output is written;
each output is written atomically (hybridmim/predict/pipeline.py).
"""
from __future__ import annotations

import logging
from pathlib import Path

from hybridmim.data.layout import NIFTI_SUFFIXES, strip_nifti_suffix
from hybridmim.predict.inference import prepare_for_inference
from hybridmim.predict.models import load_model
from hybridmim.predict.pipeline import CasePredictor, InputError, check_headers, save_label_map
from hybridmim.progress import StepProgress

log = logging.getLogger(__name__)


def group_inputs(source: str | Path, channel_names: list[str] | None,
                 channels: int) -> list[tuple[str, list[Path]]]:
    """(case name, image files) per case, in name order."""
    source = Path(source)
    if source.is_file():
        files = [source]
    elif source.is_dir():
        files = sorted(p for p in source.iterdir()
                       if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
        if not files:
            raise InputError(f"{source}: no .nii or .nii.gz files in this folder")
    else:
        raise InputError(f"{source}: no such file or folder")
    if channels == 1 or not channel_names:
        return [(strip_nifti_suffix(p.name), [p]) for p in files]
    suffixes = {f"_{name.lower()}": index for index, name in enumerate(channel_names)}
    grouped: dict[str, dict[int, Path]] = {}
    cases: list[tuple[str, list[Path]]] = []
    for path in files:
        stem = strip_nifti_suffix(path.name)
        match = next((s for s in sorted(suffixes, key=len, reverse=True)
                      if stem.lower().endswith(s)), None)
        if match is None:
            cases.append((stem, [path]))  # a 4D file holding every channel
        else:
            grouped.setdefault(stem[: -len(match)], {})[suffixes[match]] = path
    for case, found in grouped.items():
        missing = [channel_names[i] for i in range(channels) if i not in found]
        if missing:
            raise InputError(f"{source}: case {case!r} lacks channel file(s) "
                             f"{[f'{case}_{m}.nii.gz' for m in missing]}; the model takes "
                             f"{channel_names}")
        cases.append((case, [found[i] for i in range(channels)]))
    names = [case for case, _ in cases]
    if len(set(names)) != len(names):
        raise InputError(f"{source}: two inputs give the same case name; rename them")
    return sorted(cases)


def predict_inputs(model: str, source: str | Path, out: str | Path,
                   tracking_uri: str | None = None, overlap: float = 0.5,
                   precision: str = "auto") -> list[Path]:
    """Segment every input; return the written label maps ``<out>/<case>.nii.gz``."""
    loaded = load_model(model, tracking_uri)
    meta = loaded.meta
    if meta.get("stage") != "finetune" or "crop" not in meta:
        raise ValueError(f"--model {model}: a {meta.get('stage')!r} model cannot segment; give a "
                         "fine-tuned model")
    channels = int(meta.get("channels") or 1)
    cases = group_inputs(source, meta.get("channel_names"), channels)
    for _, paths in cases:  # every input, cheaply, before any work is done
        check_headers(paths, channels)
    forward, device, choice = prepare_for_inference(loaded, precision)
    predictor = CasePredictor(forward, meta, meta.get("preprocess"), overlap=overlap,
                              device=device, precision=choice.precision)
    out = Path(out)
    written = []
    progress = StepProgress(len(cases), "predict", every_s=10)
    for index, (case, paths) in enumerate(cases):
        result = predictor(paths)
        target = out / f"{case}.nii.gz"
        save_label_map(result.label, paths[0], target)
        written.append(target)
        progress.update(index + 1)
        log.info("%s → %s %s", ", ".join(p.name for p in paths), target, result.label.shape)
    progress.close()
    return written

