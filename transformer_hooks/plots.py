"""Old path, kept for users: the code lives in ``transformer_hooks.analysis.plots`` (issue 22).

The package's own modules import that module, never this one (tests/test_structure.py).
"""

from transformer_hooks.analysis.plots import *  # noqa: F403
