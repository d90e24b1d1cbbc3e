from .tl.evals import *  # noqa: F403 (moved to tl/evals.py: the old path re-exports it)
