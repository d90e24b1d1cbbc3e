"""Old path, kept for users: the code lives in ``transformer_hooks.scale`` (issue 22): the
harvest in ``scale/harvest.py``, which also exports ``ActivationDataset`` (``scale/dataset.py``).

The package's own modules import the defining modules, never this one (tests/test_structure.py).
"""

from transformer_hooks.scale.harvest import *  # noqa: F403
