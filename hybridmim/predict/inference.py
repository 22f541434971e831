"""Whole-volume prediction with MONAI's sliding-window inference (crop-sized windows, Gaussian
blending), shared by validation during fine-tuning and by the test-set evaluation."""
from __future__ import annotations

from typing import Any

import torch
from monai.inferers import sliding_window_inference
from monai.networks.utils import one_hot

from hybridmim import runtime
from hybridmim.checkpoints import LoadedModel
from hybridmim.models.backbones import backbone_of_class
from hybridmim.precision import PrecisionChoice


def prepare_for_inference(loaded: LoadedModel, precision: str, spec: dict[str, Any] | None = None
                          ) -> tuple[torch.nn.Module, torch.device, PrecisionChoice]:
    """A trained network on this machine's device in eval mode: the module to call, the device
    and the precision choice. `hybridmim predict` and the evaluation share it so that one model
    gets the same precision (``auto`` honours the backbone's CPU-bf16 exception) and the same
    forward pass (``runtime.prepare_network``) in both."""
    device = runtime.select_device()
    choice = runtime.precision_choice(precision, device,
                                      backbone_of_class(loaded.network_record.get("class", "")))
    network = loaded.network.to(device).eval()
    return runtime.prepare_network(network, device, choice.precision, spec), device, choice


@torch.no_grad()
def predict_volume(network: torch.nn.Module, image: torch.Tensor, crop: int,
                   overlap: float = 0.5, sw_batch_size: int = 4,
                   device: torch.device | str = "cpu", precision: str = "fp32",
                   regions: bool = False) -> torch.Tensor:
    """Class probabilities (K, X, Y, Z) on the CPU for one image (C, X, Y, Z), of its shape even
    when smaller than the ``crop``³ windows (the training crop; MONAI pads and crops back). Logits
    are blended first and turned into probabilities afterwards (softmax for label maps, sigmoid
    for overlapping regions), as MONAI's reference pipelines do. The caller sets eval mode."""
    if image.ndim != 4:
        raise ValueError(f"predict_volume expects an image of shape (C, X, Y, Z), got "
                         f"{tuple(image.shape)}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"sliding-window overlap must be in [0, 1), got {overlap}")
    device = torch.device(device)
    inputs = image.unsqueeze(0).to(device=device, dtype=torch.float32)
    with runtime.autocast(device, precision):
        logits = sliding_window_inference(inputs, roi_size=(crop,) * 3,
                                          sw_batch_size=sw_batch_size, predictor=network,
                                          overlap=overlap, mode="gaussian", sw_device=device,
                                          device=device)
    # Blending under autocast may leave half precision; probabilities are computed in fp32.
    logits = torch.as_tensor(logits).float()[0]
    probs = torch.sigmoid(logits) if regions else torch.softmax(logits, dim=0)
    return probs.cpu()


def probabilities_to_masks(probabilities: torch.Tensor, regions: bool) -> torch.Tensor:
    """Binary (K, X, Y, Z) masks: argmax one-hot for label maps (channel 0 = background),
    ``p > 0.5`` per channel for overlapping regions (BraTS TC/WT/ET)."""
    if regions:
        return probabilities > 0.5
    return one_hot(probabilities.argmax(dim=0, keepdim=True), probabilities.shape[0],
                   dtype=torch.bool, dim=0)
