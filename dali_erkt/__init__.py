"""dali-erkt: ERKT-Net knowledge distillation fed by an NVIDIA DALI augmentation pipeline.

    from dali_erkt import DaliLoader, Batch     # the loader as a drop-in for other KD code

The names are loaded on first use, so `import dali_erkt` does not start DALI.
"""
__version__ = "0.1.0"
__all__ = ["DaliLoader", "Batch"]


def __getattr__(name):
    if name in __all__:
        from .data import loader
        return getattr(loader, name)
    raise AttributeError(f"module 'dali_erkt' has no attribute {name!r}")
