"""Old path, kept for users: the code lives in ``transformer_hooks.analysis.lens`` (issue 22).

The package's own modules import that module, never this one (tests/test_structure.py).
"""

from transformer_hooks.analysis.lens import *  # noqa: F403
