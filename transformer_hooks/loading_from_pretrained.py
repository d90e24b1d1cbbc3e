from .tl.loading_from_pretrained import *  # noqa: F403 (moved to tl/loading_from_pretrained.py: the old path re-exports it)
