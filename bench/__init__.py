"""The benchmark suite of issue 7: each figure beside its bare-library baseline.

Run it with ``python -m bench.run [--quick] [--json PATH]``.
"""
