"""ML attack evaluations (evasion, extraction, membership inference) on CPU with torch 2.13 and ART."""
