"""infergate: the hardened KServe V2 gateway in front of Triton."""

__version__ = "0.1.0"
