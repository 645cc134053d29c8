"""`split` and `check-data`: the data set on disk."""
from __future__ import annotations

import os

from ..data.dataset import IMAGE_EXTENSIONS, check_files, make_split, save_split, scan_tree


def split(data, train_ratio: float, out_dir, *, seed: int = 0, stratify: bool = True,
          skip_check: bool = False, workers: int = 4) -> dict:
    """Draw a reproducible train/test split and save it as file lists."""
    tree = scan_tree(data)
    bad = None
    if not skip_check:
        # DALI stops on the first corrupt file, so find them now rather than mid-training.
        bad = [p for p, _ in check_files(data, [p for p, _ in tree.samples], workers=workers)]
    s = make_split(data, train_ratio, seed=seed, stratify=stratify, bad=bad)
    out = save_split(s, out_dir)
    return {"classes": len(s.classes), "train": len(s.train), "test": len(s.test),
            "ratio": train_ratio, "seed": seed, "stratified": s.stratified, "out": str(out),
            "skipped": tree.skipped}


def check_data(data, workers: int = 4) -> dict:
    """Decode every image; the unreadable ones with their reasons."""
    tree = scan_tree(data)
    bad = check_files(data, [p for p, _ in tree.samples], workers=workers)
    return {"root": os.path.abspath(data), "checked": len(tree.samples),
            "bad": [{"path": p, "reason": r} for p, r in bad], "skipped": tree.skipped}


def skipped_line(skipped: list[str]) -> str | None:
    """One line naming the files left out because they are not images by their name."""
    if not skipped:
        return None
    shown = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
    what = "file that is not an image" if len(skipped) == 1 else "files that are not images"
    return f"skipped {len(skipped)} {what} ({shown}): images end in {' '.join(IMAGE_EXTENSIONS)}"
