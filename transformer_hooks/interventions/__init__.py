"""Intervention workflows: change activations during a forward and measure the effect.

- ``patching``: TransformerLens's activation and attribution patching sweeps, and ablations.
- ``steering``: steering vectors added through hooks, generation included.
- ``das``: distributed alignment search (a trained rotation of a residual subspace).

Import the module that defines a name (``transformer_hooks.interventions.steering``); this
package imports none of them, so importing one does not import the others.
"""
