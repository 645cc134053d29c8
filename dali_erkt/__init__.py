"""dali-erkt: ERKT-Net knowledge distillation fed by an NVIDIA DALI augmentation pipeline.

    from dali_erkt import DaliLoader, Batch     # the loader as a drop-in for other KD code

The names are loaded on first use, so `import dali_erkt` does not start DALI.
"""
import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path

__version__ = "0.1.0"
__all__ = ["DaliLoader", "Batch"]


def _kernels_from_source_tree() -> None:
    """`dali_erkt.kernels` is the top-level kernels/ folder (setup.cfg's package_dir ships it
    there); run from a source tree without installing, load it from that folder, so it imports
    the same way installed or not."""
    folder = _Path(__file__).resolve().parent.parent / "kernels"
    if _util.find_spec(__name__ + ".kernels") is not None or not (folder / "__init__.py").is_file():
        return
    spec = _util.spec_from_file_location(__name__ + ".kernels", folder / "__init__.py",
                                         submodule_search_locations=[str(folder)])
    module = _util.module_from_spec(spec)
    _sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_kernels_from_source_tree()


def __getattr__(name):
    if name in __all__:
        from .data import loader
        return getattr(loader, name)
    raise AttributeError(f"module 'dali_erkt' has no attribute {name!r}")
