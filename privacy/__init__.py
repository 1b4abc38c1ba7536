"""Privacy library: PII masking, differential privacy and DP training. No HTTP, no Redis at import."""
