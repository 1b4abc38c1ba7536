"""Inputs that would make a backtracking engine, or a quadratic scan loop, slow.

One generator per pattern family (nested-quantifier bait, dense candidates that every
check rejects, entities glued back to back): ``make(n)`` gives ``n`` characters. Shared
by ``tests/privacy/test_pii_engine.py``, which checks the work RE2 is asked to do grows
linearly, and ``bench/bench_pii.py``, which prints the CPU time per 64 KiB.
"""

from __future__ import annotations

from collections.abc import Callable

PATHOLOGICAL: list[tuple[str, Callable[[int], str]]] = [
    ("a then @", lambda n: "a" * n + "@"),  # e-mail local part, no domain (PII-08)
    ("dash ones", lambda n: ("1-" * n)[:n]),  # phone/SSN/card separators (PII-08)
    ("digit pairs", lambda n: ("12-" * n)[:n]),  # phone groups
    ("space digits", lambda n: ("1 " * n)[:n]),  # spread card
    ("card groups", lambda n: ("4111 " * n)[:n]),  # card windows
    ("dotted", lambda n: ("1.1.1.1." * n)[:n]),  # IPv4
    ("colons", lambda n: ("1:" * n)[:n]),  # IPv6
    ("at dot", lambda n: ("a@a." * n)[:n]),  # e-mail domains
    ("obfuscated at", lambda n: ("a [at] b [dot] " * n)[:n]),  # e-mail [at] forms
    ("iban", lambda n: ("DE89 " * n)[:n]),  # IBAN groups
    ("dates", lambda n: ("DOB 1/1/1990 " * n)[:n]),  # dense DOBs
    ("pem", lambda n: ("-----BEGIN PRIVATE KEY-----" * n)[:n]),  # PEM without END
    ("jwt", lambda n: ("eyJ." * n)[:n]),  # JWT prefix
    ("assign", lambda n: ("password=" * n)[:n]),  # assignment keyword
    ("street", lambda n: ("1 Main Main Main " * n)[:n]),  # address words
    ("zero width", lambda n: ("j\u200b" * n)[:n]),  # normalization deletions
    ("rlo", lambda n: ("\u202e1" * n)[:n]),  # override runs
    ("fullwidth", lambda n: "\uff11" * n),  # normalization folds
    # Phones back to back, glued by the separators the glued readings read (issue 5):
    # every one is a detection, found by a plain and a glued or after-entity reading.
    ("phones glued by -", lambda n: ("415-555-0132-" * n)[:n]),
    ("phones glued by .", lambda n: ("415.555.0132." * n)[:n]),
    ("phones glued by _", lambda n: ("415-555-0132_" * n)[:n]),
]
