"""Adversarial-input detectors and output hardening: pure numpy, no torch, no HTTP.

The engine half of the ``adversarial`` stage (Envoy's ``filters/common`` vs
``filters/http`` split): :mod:`.profile` loads the per-model training profile shipped in
``triton_repo/<model>/profile.json``, :mod:`.detectors` scores requests against it and
watches query streams, :mod:`.hardening` coarsens outputs. The stage module
(``gateway/stages/adversarial.py``) only translates policy into these objects.

# SECURITY: nothing here may import torch, ART or opacus (seconds of import time and
# hundreds of MB in the gateway process); those belong to ``security_tests/`` and ``bench/``.
"""
