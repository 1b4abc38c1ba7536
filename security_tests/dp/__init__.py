"""Attacks on output differential privacy (catalogue §1.7, MI-01/02)."""
