"""Stage 4, judge: score a merge against its base and every expert on a prompt set.

:mod:`.prompts` (prompt sets) · :mod:`.scorers` (registry of scorers) and :mod:`.clip_weights`
(where their weights come from) · :mod:`.images` (the image cache) · :mod:`.models` (which models,
loaded one at a time) · :mod:`.compare` (the run) · :mod:`.stats` (paired statistics) ·
:mod:`.report` (tables and grids on disk).
"""
