"""What a compiler flag (GCC's ``-flive-patching=inline-clone`` by default) costs, function by function.

One stage per module: ``sources`` (which objects, their recorded Kbuild commands) -> ``compile`` (two
compiles per object in a private directory) -> ``measure`` (the diff engine per object, sizes, impact
sets) with ``calls`` (per-function facts from the code) and ``reasons`` (why a function changed) ->
``report`` (tables, JSON, SVG). ``run.flag_cost`` ties them together for ``klpforge flag-cost``.

>>> from klpforge.flagcost.run import FlagCostOptions, flag_cost          # doctest: +SKIP
>>> res = flag_cost(FlagCostOptions(src=Path("linux"), build=Path("build"), paths=["kernel/sched/"]))  # doctest: +SKIP
"""

__all__: list[str] = []
