"""`split` and `check-data`: the data set on disk."""
from __future__ import annotations

import os

from ..data.dataset import check_files, make_split, save_split, scan


def split(data, train_ratio: float, out_dir, *, seed: int = 0, stratify: bool = True,
          skip_check: bool = False, workers: int = 4) -> dict:
    """Draw a reproducible train/test split and save it as file lists."""
    bad = None
    if not skip_check:
        # DALI stops on the first corrupt file, so find them now rather than mid-training.
        _, samples = scan(data)
        bad = [p for p, _ in check_files(data, [p for p, _ in samples], workers=workers)]
    s = make_split(data, train_ratio, seed=seed, stratify=stratify, bad=bad)
    out = save_split(s, out_dir)
    return {"classes": len(s.classes), "train": len(s.train), "test": len(s.test),
            "ratio": train_ratio, "seed": seed, "stratified": s.stratified, "out": str(out)}


def check_data(data, workers: int = 4) -> dict:
    """Decode every image; the unreadable ones with their reasons."""
    _, samples = scan(data)
    bad = check_files(data, [p for p, _ in samples], workers=workers)
    return {"root": os.path.abspath(data), "checked": len(samples),
            "bad": [{"path": p, "reason": r} for p, r in bad]}
