"""Dropout where the method puts it in the UNet backbone: the first block and the decoder blocks.

MONAI's DynUNet takes one `dropout` value and puts a dropout layer after every convolution: the
input block, the encoder's downsampling blocks, the bottleneck, the transposed convolutions and
the 1x1 output block. Dropout in the output block zeroes ~p of the output logits in train mode
(a reconstruction of sigmoid(0) = 0.5 there, a floor under L_PR; a background logit of 0 in
segmentation). The method (and the authors' UNet) has dropout in the first block and in the
decoder's double convolutions only.

The network stays a stock DynUNet: dropout layers have no parameters, so removing them leaves the
state-dict keys unchanged and a stock `DynUNet(**kwargs)` loads the weights (in eval mode the two
compute the same function; in train mode the stock one drops in more places).
"""
from __future__ import annotations

from monai.networks.blocks import ADN
from monai.networks.nets import DynUNet


def place_unet_dropout(network: DynUNet) -> None:
    """Remove DynUNet's dropout layers outside the method's places."""
    for name, module in list(network.named_modules()):
        method_place = name.startswith("input_block.") or (name.startswith("upsamples.")
                                                           and ".conv_block." in name)
        if isinstance(module, ADN) and "D" in module._modules and not method_place:
            del module.D
