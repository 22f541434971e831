"""Initialise a segmentation network from a published pretrained model.pt.

The published state dict holds the stock network's keys (encoder + decoder + reconstruction
head). Everything is copied except:
- the output head, whose out_channels differ (reconstruction: in_channels; segmentation: classes):
  it is reported as shape_mismatched and keeps its fresh initialisation;
- with `reinit_first_layer=True`, the convolutions that read the input image (needed when a
  1-channel CT model initialises a 4-channel MRI network): reported as `reinitialised`.
Any other shape difference means the architectures differ (other widths) and is an error, as is
a first-layer channel mismatch without the flag, or another network class.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
from monai.networks.utils import copy_model_state
from torch import nn

from hybridmim.checkpoints import load_model_file, network_class_path

log = logging.getLogger(__name__)

# State-dict prefixes of the layers that read the input voxels / write the output, per class.
_FIRST_LAYER_PREFIXES = {
    "monai.networks.nets.DynUNet": ("input_block.conv1.", "input_block.conv3."),
    "monai.networks.nets.SwinUNETR": ("swinViT.patch_embed.proj.", "encoder1.layer.conv1.",
                                      "encoder1.layer.conv3."),
    "monai.networks.nets.UNETR": ("vit.patch_embedding.patch_embeddings.",
                                  "encoder1.layer.conv1.", "encoder1.layer.conv3."),
}
_OUTPUT_HEAD_PREFIXES = {
    "monai.networks.nets.DynUNet": ("output_block.",),
    "monai.networks.nets.SwinUNETR": ("out.",),
    "monai.networks.nets.UNETR": ("out.",),
}


def canonical_class(path: str) -> str:
    """`monai.networks.nets.dynunet.DynUNet` and `monai.networks.nets.DynUNet` are one class."""
    module, _, name = path.rpartition(".")
    return f"monai.networks.nets.{name}" if module.startswith("monai.networks.nets") else path


def load_into(network: nn.Module, model_file: str | os.PathLike | dict[str, Any],
              reinit_first_layer: bool = False) -> dict[str, list[str]]:
    """Copy a published model's weights into `network`; returns the key lists
    loaded, missing (in network, not in file), unexpected (in file, not in network),
    shape_mismatched (output head, left at init) and reinitialised (first layer, if asked)."""
    source = str(model_file) if not isinstance(model_file, dict) else "<model dict>"
    # load_model_file refuses a file that is not a published model.
    blob = model_file if isinstance(model_file, dict) else load_model_file(model_file)
    target_class = canonical_class(network_class_path(network))
    source_class = canonical_class(blob["network"]["class"])
    if target_class != source_class:
        raise ValueError(f"{source} holds a {source_class} but the network to initialise is a "
                         f"{target_class}; fine-tune the backbone the model was pretrained with")
    pretrained: dict[str, torch.Tensor] = blob["state_dict"]
    own = network.state_dict()
    first_layer = _keys_sharing_storage(own, _FIRST_LAYER_PREFIXES.get(target_class, ()))
    output_head = _keys_sharing_storage(own, _OUTPUT_HEAD_PREFIXES.get(target_class, ()))
    report: dict[str, list[str]] = {"loaded": [], "missing": sorted(set(own) - set(pretrained)),
                                    "unexpected": sorted(set(pretrained) - set(own)),
                                    "shape_mismatched": [], "reinitialised": []}
    wrong_channels, wrong_shapes, to_copy = [], [], {}
    for key in sorted(set(own) & set(pretrained)):
        same_shape = own[key].shape == pretrained[key].shape
        if reinit_first_layer and key in first_layer:
            report["reinitialised"].append(key)
        elif same_shape:
            to_copy[key] = pretrained[key]
        elif key in output_head:
            report["shape_mismatched"].append(key)
        elif key in first_layer and _only_input_channels_differ(own[key], pretrained[key]):
            wrong_channels.append(key)
        else:
            wrong_shapes.append(key)
    if wrong_channels:
        raise ValueError(
            f"{source} was pretrained with {blob['network']['kwargs'].get('in_channels')} input "
            f"channel(s) but the network has {own[wrong_channels[0]].shape[1]} "
            f"({wrong_channels}); set the finetune config's `first_layer: reinit` to re-initialise "
            "the first layer, or pretrain on images with the same channels")
    if any("position_embeddings" in k for k in wrong_shapes):
        raise ValueError(f"{source}: the ViT position embedding was built for img_size "
                         f"{blob['network']['kwargs'].get('img_size')}; UNETR fine-tuning must use "
                         "the pretraining crop")
    if wrong_shapes:
        raise ValueError(f"{source}: {len(wrong_shapes)} tensor(s) differ in shape, e.g. "
                         f"{wrong_shapes[:3]}: the pretrained architecture "
                         f"{blob['network']['kwargs']} differs from the network's widths")
    # Missing/unexpected keys come from a different depth or MONAI version: reported, not fatal.
    _, report["loaded"], _ = copy_model_state(network, to_copy)
    summary = (f"loaded {len(report['loaded'])}/{len(own)} tensors from {source}; output head at "
               f"init: {report['shape_mismatched'] or 'none'}; first layer re-initialised: "
               f"{report['reinitialised'] or 'no'}; missing {len(report['missing'])}, unexpected "
               f"{len(report['unexpected'])}")
    (log.warning if report["missing"] or report["unexpected"] else log.info)(summary)
    return report


def _keys_sharing_storage(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> set[str]:
    """Keys under `prefixes` plus their aliases: DynUNet registers its blocks twice (input_block
    and skip_layers.downsample are one module), so one tensor appears under two names."""
    keys = {k for k in state if k.startswith(prefixes)}
    pointers = {state[k].data_ptr() for k in keys}
    return keys | {k for k, v in state.items() if v.data_ptr() in pointers}


def _only_input_channels_differ(own: torch.Tensor, pretrained: torch.Tensor) -> bool:
    return (own.ndim == pretrained.ndim >= 2 and own.shape[0] == pretrained.shape[0]
            and own.shape[2:] == pretrained.shape[2:])
