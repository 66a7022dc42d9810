"""The benchmarks behind ``bench/run_all.py`` (one module per benchmark, plus their helpers).

This is a package, not a set of top-level scripts, so that ``make bench`` (which runs every
``bench/*.py``) runs only the entry points: ``run_all.py`` and ``profile_emit.py``.
"""
