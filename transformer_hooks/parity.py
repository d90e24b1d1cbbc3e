"""Old path, kept for users: the code lives in ``transformer_hooks.analysis.parity`` (issue 22).

The package's own modules import that module, never this one (tests/test_structure.py).
"""

from transformer_hooks.analysis.parity import *  # noqa: F403
