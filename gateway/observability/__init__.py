"""Metrics, structured logs and the audit trail: what operators and reviewers see."""
