"""Encoder / box-decoder split of the stock MONAI networks (partial region prediction).

HybridMIM reconstructs only a box of the crop (method.md): the encoder sees the whole crop, then
every feature map the decoder consumes is sliced to the box at its own resolution and the decoder
runs on the box alone. Each backbone gets an `encode` and a `decode` that call the MONAI network's
own submodules in the order of its `forward`, so the weights keep their shapes and names and the
pretrained encoder AND decoder load into the full-size segmentation network. With box start 0 the
decode is exactly the stock forward (tested).

The box always ends at the crop end; it starts at voxel `start` on every axis, which must be a
multiple of the coarsest stride the decoder slices at (checked by `HybridMIMModel`).

Where a decoder-side block is applied relative to the slicing is chosen so that the sliced map is
never a single voxel in a normalised layer (InstanceNorm refuses that in training):
- DynUNet: the encoder (input block, downsamples, bottleneck) runs on the crop; the skips and the
  bottleneck output are sliced; the up-sampling path and output block run on the box.
- SwinUNETR: swinViT runs on the crop; the skip convolutions encoder1..4 run on their sliced
  inputs (input voxels and swinViT stages 0-2), as do decoder5..1 and the output block. The
  bottleneck block encoder10 runs on the sliced stride-32 bottleneck (``slice_bottleneck``
  ``before_encoder10``, the authors' code; needs at least 2 box tokens per axis) or on the whole
  bottleneck, sliced after (``after_encoder10``): its InstanceNorm statistics then come from the
  whole crop, and a box of one token per axis works.
- UNETR: the ViT runs on the crop; its token maps (stride 16) are sliced before the up-sampling
  skip paths encoder2..4 and decoder5..2; encoder1 runs on the sliced input voxels.
"""
from __future__ import annotations

import dataclasses
import itertools
import operator

import torch
from monai.networks.nets import UNETR, DynUNet, SwinUNETR


@dataclasses.dataclass
class EncoderFeatures:
    """What the encoder hands to the decoder and the heads.

    tokens: the encoder output at the total encoder stride (B, C, crop/stride, ...); the region,
        count/location and projection heads read it, and it is the decoder's deepest input.
    maps: every other map the decoder reads, each with the stride it is sampled at (the input
        voxels themselves appear with stride 1 where the decoder re-reads them).
    """

    tokens: torch.Tensor
    token_stride: int
    maps: dict[str, tuple[torch.Tensor, int]]

    def boxed(self, key: str, start: int) -> torch.Tensor:
        """The map ``key`` (``"tokens"``: the encoder output) sliced to the box at ``start``."""
        t, stride = (self.tokens, self.token_stride) if key == "tokens" else self.maps[key]
        return box_slice(t, start, stride)


def box_slice(t: torch.Tensor, start: int, stride: int) -> torch.Tensor:
    """The part of a (B, C, X, Y, Z) map at `stride` covering voxels [start, end) on each axis;
    `start` is a multiple of `stride` (see the module docstring)."""
    s = start // stride
    return t[:, :, s:, s:, s:] if s else t


# --- DynUNet ------------------------------------------------------------------------------------

def encode_dynunet(net: DynUNet, x: torch.Tensor) -> EncoderFeatures:
    # build_segmentation_network makes DynUNets without deep supervision (one output block) and
    # with isotropic int strides: the stride after the input block, each downsample, bottleneck.
    strides = list(itertools.accumulate(net.strides, operator.mul))
    maps = {}
    h = net.input_block(x)
    maps["skip0"] = (h, strides[0])
    for i, down in enumerate(net.downsamples, start=1):
        h = down(h)
        maps[f"skip{i}"] = (h, strides[i])
    return EncoderFeatures(tokens=net.bottleneck(h), token_stride=strides[-1], maps=maps)


def decode_dynunet(net: DynUNet, feats: EncoderFeatures, start: int) -> torch.Tensor:
    h = feats.boxed("tokens", start)
    # net.upsamples[0] is the deepest up block; it pairs with the deepest skip.
    for level, up in zip(range(len(net.upsamples) - 1, -1, -1), net.upsamples):
        h = up(h, feats.boxed(f"skip{level}", start))
    return net.output_block(h)


# --- SwinUNETR ----------------------------------------------------------------------------------

def encode_swinunetr(net: SwinUNETR, x: torch.Tensor) -> EncoderFeatures:
    net._check_input_size(x.shape[2:])
    hidden = net.swinViT(x, net.normalize)
    p = net.patch_size
    maps = {"input": (x, 1)}
    maps.update({f"stage{i}": (hidden[i], p * 2 ** i) for i in range(4)})
    return EncoderFeatures(tokens=hidden[4], token_stride=p * 2 ** 4, maps=maps)


def decode_swinunetr(net: SwinUNETR, feats: EncoderFeatures, start: int,
                     slice_bottleneck: str = "before_encoder10") -> torch.Tensor:
    enc0 = net.encoder1(feats.boxed("input", start))
    enc1 = net.encoder2(feats.boxed("stage0", start))
    enc2 = net.encoder3(feats.boxed("stage1", start))
    enc3 = net.encoder4(feats.boxed("stage2", start))
    if slice_bottleneck == "before_encoder10":
        dec4 = net.encoder10(feats.boxed("tokens", start))
    else:  # after_encoder10 (a spec schema enum)
        dec4 = box_slice(net.encoder10(feats.tokens), start, feats.token_stride)
    dec3 = net.decoder5(dec4, feats.boxed("stage3", start))
    dec2 = net.decoder4(dec3, enc3)
    dec1 = net.decoder3(dec2, enc2)
    dec0 = net.decoder2(dec1, enc1)
    return net.out(net.decoder1(dec0, enc0))


# --- UNETR --------------------------------------------------------------------------------------

def encode_unetr(net: UNETR, x: torch.Tensor) -> EncoderFeatures:
    # The input is a crop of img_size (HybridMIMModel checks it): the ViT's position embedding.
    last, hidden = net.vit(x)
    stride = net.patch_size[0]
    # Transformer blocks 3, 6 and 9 feed the skip paths (MONAI UNETR.forward).
    maps = {"input": (x, 1)}
    maps.update({f"block{i}": (net.proj_feat(hidden[i]), stride) for i in (3, 6, 9)})
    return EncoderFeatures(tokens=net.proj_feat(last), token_stride=stride, maps=maps)


def decode_unetr(net: UNETR, feats: EncoderFeatures, start: int) -> torch.Tensor:
    enc1 = net.encoder1(feats.boxed("input", start))
    enc2 = net.encoder2(feats.boxed("block3", start))
    enc3 = net.encoder3(feats.boxed("block6", start))
    enc4 = net.encoder4(feats.boxed("block9", start))
    dec3 = net.decoder5(feats.boxed("tokens", start), enc4)
    dec2 = net.decoder4(dec3, enc3)
    dec1 = net.decoder3(dec2, enc2)
    return net.out(net.decoder2(dec1, enc1))


# (encode, decode) of each stock network class build_segmentation_network makes.
ADAPTERS = {
    DynUNet: (encode_dynunet, decode_dynunet),
    SwinUNETR: (encode_swinunetr, decode_swinunetr),
    UNETR: (encode_unetr, decode_unetr),
}
