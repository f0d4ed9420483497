"""Kronecker-factored optimizers."""
