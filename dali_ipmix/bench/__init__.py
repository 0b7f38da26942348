"""Throughput benchmark: the IPMix loaders and training side by side in one run.

``dali-ipmix bench`` (:mod:`.cli`) or ``run_bench(...)`` (:mod:`.runner`) -> dict.  Modules:
``data`` (the files every contender reads), ``contenders`` (one timing function per contender),
``memory`` (peak host/device memory), ``report`` (ratios, table, JSON, plot).
"""
from .cli import register  # noqa: F401  (light: heavy imports happen when the command runs)


def __getattr__(name):
    # run_bench imports torch and DALI; keep ``import dali_ipmix.bench`` cheap for the CLI.
    if name == "run_bench":
        from .runner import run_bench
        return run_bench
    raise AttributeError(name)
