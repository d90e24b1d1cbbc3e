"""TransformerLens 3.x's ``transformer_lens.utilities`` (where 3.x moved ``utils``): this library's
``utils`` helpers under that module path, with the TransformerLens-only ones defined here."""

from __future__ import annotations

from ..utils import *  # noqa: F403 (TransformerLens's utilities are this library's utils)
from ..utils import Slice, get_act_name, to_numpy  # noqa: F401 (named for readers and type checkers)
