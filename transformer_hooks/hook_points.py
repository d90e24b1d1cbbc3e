from .tl.hook_points import *  # noqa: F403 (moved to tl/hook_points.py: the old path re-exports it)
