"""Pure Linen modules: digit networks, layers with CPU-efficient lowerings, GRL."""
