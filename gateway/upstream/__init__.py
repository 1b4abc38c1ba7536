"""Upstreams: where inference really happens (Triton over gRPC, or embedded onnxruntime)."""
