"""The commands: each reads the whole configuration, resolves the runtime once, and drives the
library. `cli.py` is a thin click layer over them."""
