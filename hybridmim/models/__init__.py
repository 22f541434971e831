"""Backbones (stock MONAI networks), the HybridMIM pretraining model and weight transfer."""
from hybridmim.models.backbones import (backbone_names, build_segmentation_network,
                                        encoder_stride, network_kwargs, resolve_backbone)
from hybridmim.models.heads import HybridMIMHeads
from hybridmim.models.hybridmim_model import HybridMIMModel, build_pretrain_model, check_geometry
from hybridmim.models.transfer import load_into

__all__ = [
    "HybridMIMHeads", "HybridMIMModel", "backbone_names", "build_pretrain_model",
    "build_segmentation_network", "check_geometry", "encoder_stride", "load_into",
    "network_kwargs", "resolve_backbone",
]
