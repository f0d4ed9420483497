"""Structured matrices for SINGD's Kronecker factors."""
