"""Security and attack tests; run explicitly: pytest security_tests/."""
