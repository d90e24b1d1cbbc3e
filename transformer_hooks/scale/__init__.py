"""Work at scale: harvesting activations to disk, sweeps over processes."""
