"""Tests of singd.structures."""
