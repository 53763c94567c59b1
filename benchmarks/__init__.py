"""Side-by-side speed and memory of camlens and its peer libraries (``python -m benchmarks``).

Not part of the installed package: peers are benchmark-only dependencies
(``pip install -r requirements-bench.txt``). See :mod:`benchmarks.runner` for the method.
"""
