"""End-to-end tests: the real gateway process, real clients."""
