"""Method fidelity: one test per row of the fidelity table in docs/method.md (small tensors, CPU).

Each test pins our default and shows that the flag changes what it says it changes.
"""
from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DynUNet
from torch import nn

from hybridmim.models import build_segmentation_network

from conftest import demo_config_with as _config_with

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


# --- L_Con: the authors' ½·(CE + gradient-free MSE) vs CE ---------------------------------------

def test_consistency_default_is_the_authors_half_cross_entropy():
    from hybridmim.pretrain.losses import HybridMIMLoss, consistency_loss

    gen = torch.Generator().manual_seed(0)
    count_logits = torch.randn(2, 8, 9, generator=gen, requires_grad=True)
    loc_logits = torch.randn(2, 8, 8, generator=gen)
    implied = (loc_logits > 0).sum(-1)
    ce = nn.functional.cross_entropy(count_logits.reshape(-1, 9), implied.reshape(-1))
    mse = ((implied.float() - count_logits.argmax(-1).float()) ** 2).mean()

    authors = consistency_loss(count_logits, loc_logits)      # the default
    torch.testing.assert_close(authors, (ce + mse) / 2)
    grad_authors, = torch.autograd.grad(authors, count_logits)
    full = consistency_loss(count_logits, loc_logits, "cross_entropy")
    torch.testing.assert_close(full, ce)
    grad_full, = torch.autograd.grad(full, count_logits)
    torch.testing.assert_close(grad_authors, grad_full / 2)  # the factor 2 in effective weight
    assert HybridMIMLoss().consistency == "authors"


# --- L_PR: one mean over the batch's scored voxels vs per-sample means --------------------------

def test_pr_normalisation_default_is_one_mean_over_the_batch():
    from hybridmim.pretrain.losses import HybridMIMLoss, partial_region_loss

    box = (slice(0, 4),) * 3
    target = torch.full((2, 1, 4, 4, 4), 0.5)
    recon = torch.zeros(2, 1, 4, 4, 4)
    recon[0] = 10.0                                 # sample 0 is wrong: error (sigmoid(10)-0.5)^2
    mask = torch.zeros(2, 1, 4, 4, 4, dtype=torch.bool)
    mask[0, :, :1, :1, :1] = True                   # 1 scored voxel in sample 0
    mask[1, :, :2, :2, :2] = True                   # 8 scored voxels in sample 1 (error 0)
    err = (torch.sigmoid(torch.tensor(10.0)) - 0.5) ** 2
    torch.testing.assert_close(partial_region_loss(recon, target, box, mask), err / 9)
    torch.testing.assert_close(partial_region_loss(recon, target, box, mask, None, "sample"),
                               err / 2)
    assert HybridMIMLoss().pr_normalisation == "batch"


# --- Gradient clipping: off in pretraining (authors), a flag turns it on ------------------------

def test_pretraining_does_not_clip_by_default_and_the_flag_clips():
    from hybridmim import config as hcfg
    from hybridmim.pretrain.step import PretrainStep  # noqa: F401  (the loop that reads it)

    from conftest import ROOT

    for name in ("config.yaml", "paper.yaml"):
        cfg = hcfg.load_config(ROOT / "config" / name)
        for bb in cfg["pretraining"]["backbones"]:
            assert hcfg.pretrain_spec(cfg, bb, "hybridmim", "ct")["optim"]["grad_clip"] == 0.0
        # Fine-tuning keeps its clipping (MONAI's recipes clip; not part of this row).
        assert cfg["finetuning"]["optim"]["grad_clip"] == 1.0
    # A per-backbone pretrain_optim block no longer re-fills grad_clip with a default that would
    # override pretraining.optim.grad_clip.
    cfg = hcfg.load_config(ROOT / "config" / "config.yaml")
    cfg["pretraining"]["optim"]["grad_clip"] = 1.0
    assert hcfg.pretrain_spec(cfg, "unet", "hybridmim", "ct")["optim"]["grad_clip"] == 1.0


def test_grad_clip_flag_bounds_the_update():
    from hybridmim.training_loop import optimiser_step

    def step(grad_clip: float):
        """One optimiser step with a zero learning rate; returns (norm, gradients after it)."""
        model = nn.Linear(4, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        loss = model(torch.full((1, 4), 100.0)).sum()
        norm = optimiser_step(loss, model, optimizer,
                              torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                              torch.amp.GradScaler("cpu", enabled=False), grad_clip)
        return norm, torch.cat([p.grad.flatten() for p in model.parameters()]).norm()

    unclipped, before = step(0.0)
    assert unclipped is None and before > 1                              # default: untouched
    norm, after = step(1.0)
    assert norm == before
    torch.testing.assert_close(after, torch.tensor(1.0))


# --- SwinUNETR partial decoding: slice the bottleneck before encoder10 (authors) or after -------

SWIN = {"name": "swinunetr", "in_channels": 1, "feature_size": 12, "drop_rate": 0.1,
        "num_heads": [1, 2, 2, 4], "window_size": 4}


@pytest.mark.parametrize("where, outside_matters", [("before_encoder10", False),
                                                    ("after_encoder10", True)])
def test_swin_bottleneck_slice(where, outside_matters):
    from hybridmim.models import build_pretrain_model
    from hybridmim.models.partial_decoding import box_slice

    torch.manual_seed(0)
    method = {"proj_dim": 8} if where == "before_encoder10" else {
        "proj_dim": 8, "swin_bottleneck_slice": where}
    model = build_pretrain_model(SWIN, {"crop": 96, "region": 32, "patch": 16}, method).eval()
    with torch.no_grad():
        feats = model.encode(torch.rand(1, 1, 96, 96, 96))
        reference = model.decode(feats)
        inside = box_slice(feats.tokens, model.box_start, feats.token_stride)
        feats.tokens.add_(3.0)
        inside.sub_(3.0)                       # only the bottleneck outside the box changed
        changed = not torch.allclose(model.decode(feats), reference, atol=1e-5)
    assert changed == outside_matters


def test_swin_slice_first_needs_two_box_tokens_per_axis():
    from hybridmim.models import build_pretrain_model

    with pytest.raises(ValueError, match="swin_bottleneck_slice 'after_encoder10'"):
        build_pretrain_model(SWIN, {"crop": 64, "region": 32, "patch": 16}, {"proj_dim": 8})
    build_pretrain_model(SWIN, {"crop": 64, "region": 32, "patch": 16},
                         {"proj_dim": 8, "swin_bottleneck_slice": "after_encoder10"})


# --- The contrastive batch: whose crops are each other's negatives ------------------------------

class _TaggedVolumes(torch.utils.data.Dataset):
    """Volume i yields K crops filled with the value i (the shape of PretrainCropDataset items)."""

    def __init__(self, n: int, crops: int):
        self.n, self.crops = n, crops

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.full((self.crops, 1, 2, 2, 2), float(i)),
                "valid": torch.ones(self.crops, 1, 2, 2, 2, dtype=torch.bool)}


@pytest.mark.parametrize("volumes, crops, distinct", [(2, 2, 2), (1, 2, 1)])
def test_contrastive_batch_volumes_per_step_times_crops(volumes, crops, distinct):
    """Default: 2 volumes x 2 crops per step, negatives from both volumes; the authors' runs
    (volumes_per_step 1, crops_per_volume 2, one process per GPU) contrast 2 crops of ONE volume."""
    from hybridmim.pretrain.feed import StepFeed
    from hybridmim.runtime import DistInfo

    feed = StepFeed(_TaggedVolumes(6, crops), volumes, DistInfo(), seed=0,
                    device=torch.device("cpu"))
    images, _ = feed.next_batch()
    assert images.shape[0] == volumes * crops  # the rows NT-Xent contrasts on this process
    assert len(images.flatten(1)[:, 0].unique()) == distinct


def test_contrastive_batch_default_in_the_configs():
    from hybridmim import config as hcfg

    from conftest import ROOT

    for name in ("config.yaml", "paper.yaml"):
        cfg = hcfg.load_config(ROOT / "config" / name)
        data = hcfg.pretrain_spec(cfg, "unet", "hybridmim", "ct")["data"]
        assert (data["volumes_per_step"], data["crops_per_volume"]) == (2, 2)
        assert cfg["pretraining"]["methods"]["hybridmim"].get("gather_negatives", False) is False


# --- Architecture: stock MONAI DynUNet, not the authors' max-pooling UNet -----------------------

def test_unet_backbone_is_a_strided_dynunet_with_the_documented_parameter_count():
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("param_counts",
                                                  ROOT / "benchmarks" / "param_counts.py")
    counts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(counts)
    with torch.device("meta"):  # shapes only: full paper widths without the arithmetic
        ours, authors = counts.ours(), counts.authors_topology()
    assert isinstance(ours, DynUNet)
    assert not any(isinstance(m, nn.MaxPool3d) for m in ours.modules())
    assert ours.strides == [1, 2, 2, 2, 1]
    # The last decoder level up-samples to 64 channels (authors: half of 64 = 32).
    assert ours.upsamples[-1].transp_conv.conv.out_channels == 64
    assert authors.ups[-1].upsample.deconv.out_channels == 32
    text = (ROOT / "docs" / "method.md").read_text()
    for n in (counts.count(ours), counts.count(authors)):
        assert f"{n:,}" in text, f"docs/method.md does not state the parameter count {n:,}"


# --- Pretraining data: the native-spacing cache (authors) vs the fine-tuning cache --------------

def test_native_pretraining_cache_keeps_spacing_and_whole_volume(tmp_path):
    import json

    import nibabel as nib

    from conftest import ROOT
    from hybridmim import config as hcfg
    from hybridmim.data.pipeline import acquire_dataset, preprocess_and_split
    from hybridmim.data.prepare.pretrain_cache import build_native_cache
    from hybridmim.data.prepare.splits import pretraining_cases

    config = {"datasets": {"demo_spleen": {"num_cases": 4, "num_test": 1, "seed": 0}}}
    raw = acquire_dataset(config, "demo_spleen", data_root=tmp_path)
    preprocess_and_split(config, "demo_spleen", data_root=tmp_path)
    splits = build_native_cache(config, "demo_spleen", data_root=tmp_path)
    native, resampled = splits.parent, tmp_path / "processed" / "demo_spleen"
    index = json.loads((native / "dataset.json").read_text())
    finetune_index = json.loads((resampled / "dataset.json").read_text())
    assert index["recipe"]["spacing"] is None and index["recipe"]["crop_foreground"] is False
    assert "crop_foreground" not in finetune_index["recipe"]  # existing caches keep their hash
    assert index["recipe_hash"] != finetune_index["recipe_hash"]
    raw_index = json.loads((raw / "dataset.json").read_text())
    for case in index["cases"]:
        image = nib.load(raw / next(c["image"] for c in raw_index["training"]
                                    if c["image"].split("/")[-1] == f"{case['case']}.nii.gz"))
        assert sorted(case["shape"][1:]) == sorted(image.shape[:3])          # whole volume
        assert sorted(case["spacing"]) == pytest.approx(sorted(image.header.get_zooms()[:3]))
    assert splits.read_text() and json.loads(splits.read_text()) == json.loads(
        (resampled / "splits.json").read_text())
    assert pretraining_cases([native])[str(native)] == pretraining_cases([resampled])[str(resampled)]

    # config/paper.yaml reads the native cache; the demo reads the fine-tuning cache.
    paper = hcfg.load_config(ROOT / "config" / "paper.yaml")
    dirs = [d["processed_dir"] for d in hcfg.pretrain_spec(paper, "unet", "hybridmim",
                                                           "ct")["data"]["datasets"]]
    assert dirs and all(d.startswith("data/pretrain/") for d in dirs)
    demo = hcfg.load_config(ROOT / "config" / "config.yaml")
    assert all(d["processed_dir"].startswith("data/processed/") for d in
               hcfg.pretrain_spec(demo, "unet", "hybridmim", "ct")["data"]["datasets"])
