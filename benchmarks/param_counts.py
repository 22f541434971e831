"""Parameter counts of the UNet backbones at the paper's widths (64-64-128-256-512, 1 channel in,
1 out): ours (stock MONAI DynUNet, strided convolutions) and the authors' UNet topology.

The authors' pretraining UNet is MONAI's BasicUNet layout with a fourth, pooling-free stage:
two 3x3x3 convolutions per stage (bias, InstanceNorm, LeakyReLU 0.1), 2x max-pooling between the
first four stages, and decoder blocks that up-sample with a transposed convolution to HALF the
input channels before concatenating the skip (kernel 2, or 1 after the pooling-free stage), then
a 1x1 output convolution. It is rebuilt here from MONAI's own BasicUNet blocks, only to count
parameters (docs/method.md quotes these numbers; tests/test_fidelity.py checks them).

    python benchmarks/param_counts.py
"""
from __future__ import annotations

import json

from torch import nn

PAPER_FILTERS = [64, 64, 128, 256, 512]


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def ours(filters=PAPER_FILTERS) -> nn.Module:
    from hybridmim.models import build_segmentation_network

    network, _, _ = build_segmentation_network({"name": "unet", "filters": list(filters)},
                                               out_channels=1, crop=96)
    return network


def authors_topology(filters=PAPER_FILTERS) -> nn.Module:
    from monai.networks.blocks import UpSample
    from monai.networks.nets.basic_unet import Down, TwoConv, UpCat

    act = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})
    norm = ("instance", {"affine": True})
    f = list(filters)
    net = nn.Module()
    net.first = TwoConv(3, 1, f[0], act, norm, True, 0.1)
    net.downs = nn.ModuleList(Down(3, f[d], f[d + 1], act, norm, True) for d in range(4))
    net.ups = nn.ModuleList(UpCat(3, f[4 - d], f[3 - d], f[3 - d], act, norm, True, 0.1)
                            for d in range(4))
    # The deepest decoder block follows the pooling-free stage: its up-sampling is 1x1x1.
    net.ups[0].upsample = UpSample(3, f[4], f[4] // 2, scale_factor=1, mode="deconv")
    net.out = nn.Conv3d(f[0], 1, 1)
    return net


def main() -> None:
    print(json.dumps({"dynunet_ours": count(ours()), "unet_authors": count(authors_topology())},
                     indent=1))


if __name__ == "__main__":
    main()
