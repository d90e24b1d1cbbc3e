"""TransformerLens 3.x's module path ``utilities`` (where it moved ``utils``): this library's ``utils``
and the TransformerLens-only helpers of ``tl/utilities.py``."""

from .tl.utilities import *  # noqa: F403
from .utils import *  # noqa: F403
