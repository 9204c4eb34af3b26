"""Stage 3, observe: record what the gates of a merge do, and draw it.

:mod:`.recording` (``record_gates`` -> a tidy frame) · :mod:`.gate_stats` (per-call reductions) ·
:mod:`.diagnostics` (does each site route by domain?) · :mod:`.plots` · :mod:`.explore` (widgets).
"""
