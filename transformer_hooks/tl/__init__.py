"""The TransformerLens compatibility layer: TransformerLens's module paths and names that ported
code imports (``hook_points``, ``loading_from_pretrained``, ``evals``, ``HookedTransformerConfig``
in ``config``, the 3.x ``utilities`` module), each over this library's own implementation. The
old paths (``transformer_hooks.hook_points``, ...) re-export these modules."""
