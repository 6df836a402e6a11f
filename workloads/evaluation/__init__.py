"""Evaluation: the ``evaluate`` stage (``evaluate.py``), its answers (``generation.py``: batched
greedy decoding; ``lmms_backend.py``: lmms-eval), scores (``metrics.py``), intervals and paired
tests (``stats.py``), checks that flag results that cannot be right (``checks.py``: answer
floors, image reliance) and the chart (``charts.py``)."""
