"""Tests of the wire fronts."""
