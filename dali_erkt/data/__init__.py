"""Data: dataset scanning and splits, augmentation plans, the DALI pipeline and loaders."""
