"""Analysis workflows: read a model's activations and explain them.

- ``lens``: the logit lens: every layer's residual stream (and each attention and MLP output)
  read through the final norm and the unembedding.
- ``dla``: direct logit attribution of heads, layers and the embeddings (the ``dla`` command).
- ``circuits``: edge attribution patching (EAP, EAP-IG), pruning, circuit evaluation, path patching.
- ``plots``: the heatmaps and line plots the commands and notebooks draw.
- ``parity``: a layer-by-layer comparison with Hugging Face transformers (the ``parity`` command).

Import the module that defines a name (``transformer_hooks.analysis.lens``); this package
imports none of them, so importing one does not import the others.
"""
