"""Tests of the upstreams: repository reader, embedded onnxruntime, Triton over gRPC."""
