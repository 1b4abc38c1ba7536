"""Model monitoring: data drift (inputs) and prediction drift (outputs) against the training profile.

``policy`` (the ``drift:`` block of a model), ``stats`` (PSI, KS), ``window`` (bounded
sliding windows), ``reference`` (profile histograms), ``evaluate`` (one verdict),
``monitor`` (sampling, background task, gauges, audit), ``report`` (text rendering, CLI).
Nothing here is imported by this package's ``__init__``: the policy schema imports
``gateway.drift.policy`` alone.
"""
