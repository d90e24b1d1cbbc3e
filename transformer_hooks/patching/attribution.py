"""Old path, kept for users: the code lives in ``transformer_hooks.interventions.patching.attribution`` (issue 22).

The package's own modules import that module, never this one (tests/test_structure.py).
"""

from transformer_hooks.interventions.patching.attribution import *  # noqa: F403
