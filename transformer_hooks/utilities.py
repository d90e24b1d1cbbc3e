from .tl.utilities import *  # noqa: F403 (TransformerLens 3.x's module path for utils)
