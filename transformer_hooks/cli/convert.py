"""``convert``: convert a checkpoint once into transformer_hooks's own format, load it fast
forever after: ``python -m weights_conversion``'s command, which defines it (``add_arguments``
and ``run`` live with ``convert`` in ``weights_conversion/__main__.py``)."""

from __future__ import annotations

from weights_conversion.__main__ import add_arguments, run

NAME = "convert"
SUMMARY = "convert a checkpoint once (preset, repo id, HF directory, .gguf) into a fast-loading directory"
EXAMPLE = "python -m transformer_hooks convert gpt2 gpt2-converted/ --dtype bfloat16"

__all__ = ["EXAMPLE", "NAME", "SUMMARY", "add_arguments", "run"]
