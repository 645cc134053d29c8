"""dali-erkt: ERKT-Net knowledge distillation fed by an NVIDIA DALI augmentation pipeline."""
__version__ = "0.1.0"
