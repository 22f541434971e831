"""Backbones, partial region decoding, pretraining heads and weight transfer (tiny widths, CPU)."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hybridmim.checkpoints import build_network, load_model_file, publish_model
from hybridmim.models import (HybridMIMHeads, build_pretrain_model, build_segmentation_network,
                              encoder_stride, load_into)
from hybridmim.models.partial_decoding import box_slice

TINY = {
    "unet": {"name": "unet", "in_channels": 1, "filters": [4, 4, 8, 16, 32], "dropout": 0.1},
    "swinunetr": {"name": "swinunetr", "in_channels": 1, "feature_size": 12, "drop_rate": 0.1,
                  "num_heads": [1, 2, 2, 4], "window_size": 4},
    "unetr": {"name": "unetr", "in_channels": 1, "feature_size": 4, "hidden_size": 48,
              "mlp_dim": 96, "num_heads": 4, "dropout_rate": 0.1},
}
BACKBONES = sorted(TINY)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def model_for(name: str, crop: int = 64, box: str = "partial", **geometry):
    geo = {"crop": crop, "region": 32, "patch": 16, **geometry}
    # SwinUNETR at crop 64 has one box token per axis: encoder10 must run before the slicing
    # (tests/test_fidelity.py covers the authors' slice-first default at crop 96).
    return build_pretrain_model(TINY[name], geo, {"box": box, "proj_dim": 16,
                                                  "swin_bottleneck_slice": "after_encoder10"})


def meta_model(name: str, crop: int = 64, box: str = "partial"):
    """The model on the meta device: real module code, shapes and FLOP counts, no arithmetic."""
    return model_for(name, crop, box).to("meta")


def flops(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("crop", [64, 96])
def test_partial_forward_shapes(name, crop):
    model = meta_model(name, crop).train()  # training mode: InstanceNorm refuses 1-voxel maps
    out = model(torch.empty(2, 1, crop, crop, crop, device="meta"))
    side = crop - 32
    assert out["recon"].shape == (2, 1, side, side, side)
    assert out["box"] == (slice(32, crop),) * 3
    n_regions = (crop // 32) ** 3
    assert out["count_logits"].shape == (2, n_regions, 9)
    assert out["loc_logits"].shape == (2, n_regions, 8)
    assert out["proj"].shape == (2, 16)
    target = torch.zeros(2, 1, crop, crop, crop)
    assert target[(..., *out["box"])].shape == out["recon"].shape
    full = meta_model(name, crop, box="full").train()
    assert full(torch.empty(2, 1, crop, crop, crop, device="meta"))["recon"].shape == (
        2, 1, crop, crop, crop)


@pytest.mark.parametrize("name", BACKBONES)
def test_full_box_decode_is_the_stock_network_forward(name):
    """`box: full` runs the MONAI network's own submodules in its own order: same output."""
    model = model_for(name, box="full").eval()
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        out = model(x)
        assert out["recon"].shape == (1, 1, 64, 64, 64)
        assert out["box"] == (slice(0, 64),) * 3
        torch.testing.assert_close(out["recon"], model.network(x), rtol=0, atol=0)
        # the contrastive second pass: encoder + projection only, same projection
        torch.testing.assert_close(model.project(x), out["proj"])


@pytest.mark.parametrize("name", BACKBONES)
def test_partial_decode_reads_only_the_box_of_every_encoder_map(name):
    """Perturbing the decoder inputs outside the box leaves the reconstruction unchanged; inside,
    each one changes it. Catches a skip sliced at the wrong offset or resolution. (Equality with
    a slice of the full decode does not hold: InstanceNorm statistics span the decoded extent.)"""
    model = model_for(name).eval()
    with torch.no_grad():
        feats = model.encode(torch.rand(1, 1, 64, 64, 64))
        reference = model.decode(feats)
        maps = {"tokens": (feats.tokens, feats.token_stride), **feats.maps}
        if name == "swinunetr":
            del maps["tokens"]  # encoder10 convolves the whole (tiny) bottleneck before slicing
        insides = {}
        for key, (tensor, stride) in maps.items():
            insides[key] = box_slice(tensor, model.box_start, stride)
            tensor.add_(5.0)
            insides[key].sub_(5.0)  # only the outside of the box differs now
        torch.testing.assert_close(model.decode(feats), reference)
        for key, inside in insides.items():
            inside.add_(5.0)
            assert not torch.allclose(model.decode(feats), reference, atol=1e-4), key
            inside.sub_(5.0)


@pytest.mark.parametrize("name", BACKBONES)
def test_partial_forward_trains_every_parameter(name):
    """Every trainable parameter gets a gradient: DDP needs no find_unused_parameters."""
    model = model_for(name).train()
    out = model(torch.rand(1, 1, 64, 64, 64))
    sum(out[k].float().mean() for k in ("recon", "count_logits", "loc_logits", "proj")).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(".norm_cross_attn." in n for n in frozen)  # MONAI's unused ViT layer norms


@pytest.mark.parametrize("name", BACKBONES)
def test_partial_box_costs_fewer_flops_than_full_reconstruction(name):
    partial, full = meta_model(name), meta_model(name, box="full")
    x = torch.empty(1, 1, 64, 64, 64, device="meta")
    partial_flops, full_flops = flops(partial, x), flops(full, x)
    # the 32^3 box is 1/8 of the crop; the encoder still sees all of it
    assert partial_flops < 0.6 * full_flops
    encoder_flops = flops(partial.project, x)
    assert encoder_flops < partial_flops


def test_region_tokens_follow_the_raster_order_of_the_region_grid():
    heads = HybridMIMHeads(channels=6, patches_per_region=8, proj_dim=5, region_window=2)
    encoded = torch.randn(2, 6, 4, 6, 4)  # region grid (Gx, Gy, Gz) = (2, 3, 2): 12 regions
    with torch.no_grad():
        before = heads(encoded)
        i, j, k = 1, 2, 0
        encoded[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2, 2 * k:2 * k + 2] += 3.0
        after = heads(encoded)
    index = (i * 3 + j) * 2 + k
    for key in ("count_logits", "loc_logits"):
        assert before[key].shape[1] == 12
        changed = (before[key] - after[key]).abs().amax(dim=(0, 2)) > 1e-6
        assert changed.nonzero().flatten().tolist() == [index], key
    assert not torch.allclose(before["proj"], after["proj"])


@pytest.mark.parametrize("name", BACKBONES)
def test_each_region_token_pools_its_own_part_of_the_encoder_output(name):
    model = model_for(name, crop=96).eval()
    stride = encoder_stride(TINY[name])
    grid_side = 96 // stride
    encoded = torch.randn(1, model.heads.count.in_features, grid_side, grid_side, grid_side)
    with torch.no_grad():
        before = model.heads(encoded)["count_logits"]
        w = 32 // stride
        encoded[:, :, 2 * w:3 * w, 0:w, w:2 * w] -= 2.0  # region (2, 0, 1) of the 3x3x3 grid
        after = model.heads(encoded)["count_logits"]
    changed = (before - after).abs().amax(dim=(0, 2)) > 1e-6
    assert changed.nonzero().flatten().tolist() == [(2 * 3 + 0) * 3 + 1]


def test_encoder_strides():
    assert [encoder_stride(TINY[n]) for n in ("unet", "swinunetr", "unetr")] == [8, 32, 16]


@pytest.mark.parametrize("name", BACKBONES)
def test_segmentation_network_kwargs_rebuild_the_same_network(name):
    net, class_path, kwargs = build_segmentation_network(TINY[name], out_channels=3, crop=64)
    assert class_path == f"monai.networks.nets.{type(net).__name__}"
    kwargs = json.loads(json.dumps(kwargs))
    rebuilt = build_network({"network": {"class": class_path, "kwargs": kwargs},
                             "state_dict": net.state_dict()})
    assert rebuilt.state_dict().keys() == net.state_dict().keys()
    if name == "unetr":
        assert kwargs["img_size"] == [64, 64, 64]


@pytest.mark.parametrize("backbone, geometry, method, message", [
    ({"name": "resnet"}, {}, {}, "backbone.name: 'resnet' is not one of ['unet', 'swinunetr'"),
    ({"name": "unet", "filters": [8, 16]}, {}, {}, "backbone.filters: [8, 16] is too short"),
    ({"name": "unet", "widths": [8]}, {}, {}, "('widths' was unexpected)"),
    ({"name": "swinunetr", "feature_size": 16}, {}, {}, "multiple of 12"),
    ({"name": "unetr", "hidden_size": 50, "num_heads": 4}, {}, {}, "divisible by num_heads"),
    ({"name": "unet"}, {"crop": 80}, {},
     "geometry.crop (80) must be a multiple of geometry.region (32)"),
    ({"name": "unet"}, {"patch": 12}, {},
     "geometry.region (32) must be a multiple of geometry.patch (12)"),
    ({"name": "swinunetr"}, {"region": 16, "patch": 8}, {}, "encoder stride 32"),
    ({"name": "unet"}, {"crop": 32}, {}, "at least 2 regions"),
])
def test_bad_configuration_is_refused_with_the_key_named(backbone, geometry, method, message):
    with pytest.raises(ValueError) as err:
        build_pretrain_model(backbone, {"crop": 64, "region": 32, "patch": 16, **geometry},
                             method)
    assert message in str(err.value)


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"geometry.crop"):
        model_for("unet")(torch.rand(1, 1, 32, 32, 32))


# --- weight transfer ----------------------------------------------------------------------------

def publish_pretrained(tmp_path, name: str, in_channels: int = 1):
    backbone = {**TINY[name], "in_channels": in_channels}
    model = build_pretrain_model(backbone, {"crop": 64, "region": 32, "patch": 16},
                                 {"box": "partial", "proj_dim": 16,
                                  "swin_bottleneck_slice": "after_encoder10"})
    path = tmp_path / f"{name}.pt"
    publish_model(path, model.network_class, model.network_kwargs, model.network.state_dict(),
                  meta={"stage": "pretrain"}, heads=model.heads_record())
    return path, model


def assert_copied(network, pretrained, keys):
    own = network.state_dict()
    for key in keys:
        torch.testing.assert_close(own[key], pretrained.network.state_dict()[key], msg=key)


@pytest.mark.parametrize("name", BACKBONES)
def test_pretrained_weights_load_except_the_output_head(tmp_path, name, caplog):
    path, pretrained = publish_pretrained(tmp_path, name)
    network, _, _ = build_segmentation_network(TINY[name], out_channels=14, crop=64)
    with caplog.at_level(logging.INFO, logger="hybridmim.models.transfer"):
        report = load_into(network, str(path))
    head = "output_block." if name == "unet" else "out."
    own = network.state_dict()
    assert report["shape_mismatched"] == sorted(k for k in own if k.startswith(head))
    assert len(report["shape_mismatched"]) == 2  # the output conv's weight and bias
    assert report["missing"] == report["unexpected"] == report["reinitialised"] == []
    assert set(report["loaded"]) | set(report["shape_mismatched"]) == set(own)
    assert_copied(network, pretrained, report["loaded"])
    assert "loaded" in caplog.text and "output head" in caplog.text
    # the model file's own dict works too, and the heads record rebuilds the heads
    blob = load_model_file(path)
    assert load_into(network, blob)["loaded"] == report["loaded"]
    heads = HybridMIMHeads(**blob["heads"]["kwargs"])
    heads.load_state_dict(blob["heads"]["state_dict"])


@pytest.mark.parametrize("name", ["unet", "swinunetr"])
def test_one_channel_model_initialises_a_four_channel_network_only_with_reinit(tmp_path, name):
    path, pretrained = publish_pretrained(tmp_path, name, in_channels=1)
    network, _, _ = build_segmentation_network({**TINY[name], "in_channels": 4}, 3, crop=64)
    with pytest.raises(ValueError, match="first_layer: reinit"):
        load_into(network, path)
    fresh = {k: v.clone() for k, v in network.state_dict().items()}
    report = load_into(network, path, reinit_first_layer=True)
    assert report["reinitialised"]
    first = "input_block.conv1.conv.weight" if name == "unet" else "swinViT.patch_embed.proj.weight"
    assert first in report["reinitialised"]
    torch.testing.assert_close(network.state_dict()[first], fresh[first])
    assert_copied(network, pretrained, report["loaded"])
    own = set(network.state_dict())
    assert (set(report["loaded"]) | set(report["reinitialised"])
            | set(report["shape_mismatched"])) == own


def test_other_architectures_are_refused(tmp_path):
    path, _ = publish_pretrained(tmp_path, "unet")
    swin, _, _ = build_segmentation_network(TINY["swinunetr"], 2, crop=64)
    with pytest.raises(ValueError, match="DynUNet.*SwinUNETR"):
        load_into(swin, path)
    wider, _, _ = build_segmentation_network({**TINY["unet"], "filters": [8, 8, 16, 32, 64]}, 2,
                                             crop=64)
    with pytest.raises(ValueError, match="differ in shape"):
        load_into(wider, path)
