"""Test-only helpers: the MLServer stand-in for Triton (harness and runtime)."""
