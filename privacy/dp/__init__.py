"""Output differential privacy: OpenDP noise on an exact grid, accounting and budgets.

- :mod:`privacy.dp.mechanisms` — clamp, noise (OpenDP Laplace / Gaussian) and grid.
- :mod:`privacy.dp.accounting` — what a row costs: basic composition (Laplace), RDP (Gaussian).
- :mod:`privacy.dp.ledger` — per-tenant budgets per period, reserve-then-commit.

A pure library: no gateway, HTTP or Redis imports; never torch or opacus.
"""
