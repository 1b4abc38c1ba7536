"""Security stages: small, independent, built once per policy revision."""
