"""The README renderers, one module per topic; ``benchmarks/report.py`` maps each generated block
to its renderer (``BLOCKS``) and rewrites the docs. ``base.py`` holds what they share."""
