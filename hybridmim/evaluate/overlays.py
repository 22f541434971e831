"""Qualitative overlay figure: one axial slice per case — image, ground truth, prediction.

The slice is the middle of the ground truth's extent along Z (the axial axis of the RAS-oriented
cache), so a small structure is visible; a case without foreground falls back to the middle of
the volume. Axial slices are drawn with anterior up; CT in radiological orientation (the
patient's right on the image's left: the RAS cache's X, which grows towards the patient's right,
grows leftwards on screen), other modalities with the patient's left on the left.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch


def axial_index(truth: torch.Tensor) -> int:
    """Z index to show for (K, X, Y, Z) ground-truth masks."""
    occupied = truth.reshape(-1, truth.shape[-1]).any(dim=0).nonzero().flatten()
    if occupied.numel() == 0:
        return truth.shape[-1] // 2
    return int((occupied.min() + occupied.max()) // 2)


def paint(masks: torch.Tensor, order: Sequence[int]) -> np.ndarray:
    """(K, X, Y) binary masks → (X, Y) int map, 0 = nothing, k + 1 = structure k. Channels are
    painted in ``order`` so that nested regions (BraTS WT ⊃ TC ⊃ ET) stay visible."""
    out = np.zeros(masks.shape[1:], dtype=np.int64)
    for k in order:
        out[masks[k].numpy().astype(bool)] = k + 1
    return out


def overlay_slice(image: torch.Tensor, truth: torch.Tensor, prediction: torch.Tensor,
                  case: str) -> dict:
    """The 2-D arrays of one case's figure row; keeps only a slice so memory stays small.
    ``truth``/``prediction`` are (K, X, Y, Z) foreground masks (no background channel)."""
    z = axial_index(truth)
    truth_slice, pred_slice = truth[..., z].cpu(), prediction[..., z].cpu()
    # Larger structures first so that smaller (often nested) ones are painted on top.
    order = sorted(range(truth.shape[0]), key=lambda k: -int(truth_slice[k].sum()))
    return {"case": case, "z": z, "image": image[0, ..., z].float().cpu().numpy(),
            "truth": paint(truth_slice, order), "prediction": paint(pred_slice, order)}


def save_overlay_figure(rows: list[dict], names: Sequence[str], path: str | os.PathLike,
                        radiological: bool = False) -> None:
    """Write a PNG with one row per case (image | ground truth | prediction), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from hybridmim.atomic import atomic_path

    colours = plt.get_cmap("tab20").colors
    cmap = ListedColormap([colours[k % len(colours)] for k in range(len(names))])
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for row, ax_row in zip(rows, axes):
        low, high = np.percentile(row["image"], [1, 99])
        for ax, title, labels in zip(ax_row, ("image", "ground truth", "prediction"),
                                     (None, row["truth"], row["prediction"])):
            ax.imshow(row["image"].T, cmap="gray", origin="lower", vmin=low, vmax=high)
            if labels is not None:
                shown = np.ma.masked_equal(labels, 0) - 1
                ax.imshow(shown.T, cmap=cmap, origin="lower", vmin=0, vmax=max(len(names) - 1, 1),
                          alpha=0.5, interpolation="nearest")
            if radiological:
                ax.invert_xaxis()
            ax.set_title(f"{row['case']} z={row['z']}: {title}", fontsize=8)
            ax.axis("off")
    handles = [Patch(color=cmap(k), label=name) for k, name in enumerate(names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(names), 7), fontsize=7)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
