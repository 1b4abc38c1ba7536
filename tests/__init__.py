"""infergate tests."""
