"""Segmentation fine-tuning (train.py) and sliding-window inference (inference.py)."""
