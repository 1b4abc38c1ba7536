"""Tests of the fetching key sources (JWKS URL, OIDC discovery)."""
