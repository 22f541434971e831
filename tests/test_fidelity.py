"""Method fidelity: one test per row of the fidelity table in docs/method.md (small tensors, CPU).

Each test pins our default and shows that the flag changes what it says it changes.
"""
from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DynUNet
from torch import nn

from hybridmim.models import build_segmentation_network

UNET = {"name": "unet", "in_channels": 1, "filters": [4, 4, 8, 16, 32], "dropout": 0.1}


def dropout_layers(net: nn.Module) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


# --- UNet dropout: first block and decoder only -------------------------------------------------

def test_unet_dropout_only_in_the_first_block_and_the_decoder_convolutions():
    net, _, _ = build_segmentation_network(UNET, out_channels=2, crop=32)
    places = dropout_layers(net)
    assert places, "the UNet lost its dropout altogether"
    for name in places:
        assert name.startswith("input_block.") or (
            name.startswith("upsamples.") and ".conv_block." in name), name
    # Both convolutions of the first block and of every decoder block keep theirs.
    assert sum(n.startswith("input_block.") for n in places) == 2
    assert sum(n.startswith("upsamples.") for n in places) == 2 * len(net.upsamples)
    for forbidden in ("downsamples.", "bottleneck.", "output_block.", ".transp_conv."):
        assert not any(forbidden in f".{n}" for n in places), forbidden


def test_unet_output_logits_are_never_dropped_in_train_mode():
    torch.manual_seed(0)
    net, _, _ = build_segmentation_network(UNET, out_channels=2, crop=32)
    net.train()
    out = net(torch.rand(2, 1, 32, 32, 32))
    assert (out == 0).sum() == 0
    # The stock network with the same kwargs drops ~10% of its logits: the defect this fixes.
    stock = DynUNet(**build_segmentation_network(UNET, 2, 32)[2]).train()
    assert (stock(torch.rand(2, 1, 32, 32, 32)) == 0).float().mean() > 0.05


def test_stock_dynunet_loads_the_weights_and_computes_the_same_in_eval_mode():
    net, _, kwargs = build_segmentation_network(UNET, out_channels=2, crop=32)
    stock = DynUNet(**kwargs)
    assert stock.state_dict().keys() == net.state_dict().keys()
    stock.load_state_dict(net.state_dict(), strict=True)
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(stock.eval()(x), net.eval()(x))


# --- L_CL needs encoder dropout -----------------------------------------------------------------

def _config_with(tmp_path, mutate):
    import yaml

    from conftest import ROOT

    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    mutate(cfg)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_contrastive_term_without_encoder_dropout_is_refused_at_parse_time(tmp_path):
    from hybridmim import config as hcfg

    no_dropout = _config_with(tmp_path, lambda c: c["backbones"]["unet"].update(dropout=0.0))
    with pytest.raises(hcfg.ConfigError, match=r"(?s)pretraining\.methods\.hybridmim on "
                       r"backbones\.unet.*two views are identical.*backbone\.dropout"):
        hcfg.load_config(no_dropout)

    # Without the contrastive term the same backbone is fine.
    def no_cl(c):
        c["backbones"]["unet"]["dropout"] = 0.0
        c["pretraining"]["methods"]["hybridmim"]["loss_weights"]["cl"] = 0.0
    hcfg.load_config(_config_with(tmp_path, no_cl))


def test_pretrain_spec_refuses_unetr_without_dropout():
    from hybridmim.pretrain.spec import PretrainSpecError, check_contrastive_views

    unetr = {"name": "unetr", "dropout_rate": 0.0}
    with pytest.raises(PretrainSpecError, match="backbone.dropout_rate"):
        check_contrastive_views(unetr, {"kind": "hybridmim"})
    check_contrastive_views({**unetr, "dropout_rate": 0.1}, {"kind": "hybridmim"})
    check_contrastive_views(unetr, {"kind": "simmim"})  # SimMIM has no contrastive term
