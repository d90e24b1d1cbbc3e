"""Moved to ``transformer_hooks.scale.plan``; this path stays for users."""

from .scale.plan import *  # noqa: F403
