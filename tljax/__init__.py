"""tljax: transfer learning in clean functional JAX."""
