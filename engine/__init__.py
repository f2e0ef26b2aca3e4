"""dmd-engine: wires models, losses, data and training together."""
