from .tl.config import *  # noqa: F403 (moved to tl/config.py: the old path re-exports it)
