"""Working at scale: ``plan`` (the memory a model needs, before loading it)."""
