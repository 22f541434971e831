"""Backbones (stock MONAI networks), the HybridMIM pretraining model and weight transfer."""
from hybridmim.models.backbones import build_segmentation_network, encoder_stride
from hybridmim.models.heads import HybridMIMHeads
from hybridmim.models.hybridmim_model import build_pretrain_model
from hybridmim.models.transfer import load_into

__all__ = ["HybridMIMHeads", "build_pretrain_model", "build_segmentation_network",
           "encoder_stride", "load_into"]
