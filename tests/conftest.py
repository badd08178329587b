"""Test configuration: fast compiles, strict numerics."""

import jax

# Compilation dominates on CPU; the tests check values, not speed.
jax.config.update("jax_disable_most_optimizations", True)
# Catch silent broadcasting between mismatched axes.
jax.config.update("jax_numpy_rank_promotion", "raise")
