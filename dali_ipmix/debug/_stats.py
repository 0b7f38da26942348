"""DALI's executor statistics as a table (``--stats`` of ``graph`` and ``stages``).

``Pipeline.executor_statistics()`` needs a pipeline built with ``exec_dynamic=False,
enable_memory_stats=True`` (``_common.STATS_OPTIONS``).  In DALI 2.4 it reports memory per
operator output (used and reserved bytes, and the largest sample); it has no timing.  The time
per batch is measured here; per-operator time needs a profiler: DALI marks each operator run
with an NVTX range (``[DALI][CPU op]``, ``[DALI][GPU op]``, ``[DALI][Mixed op]``) that Nsight
Systems shows on its timeline.
"""
from __future__ import annotations

import re
import time
from collections import defaultdict
from typing import Dict, List

from ..errors import UserError

UNSET = 1 << 62        # DALI reports 2^63 as the "max" of outputs that never held data


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _total(values) -> int:
    return sum(v for v in values if v < UNSET)


def memory_rows(stats: Dict[str, dict], type_of: Dict[str, str]) -> List[dict]:
    """One row per operator: name, device, type, used/reserved bytes (all outputs) and the largest
    sample.  Keys of ``stats`` are DALI's "<DEVICE>_<operator name>"."""
    rows = []
    for key, st in stats.items():
        device, _, name = key.partition("_")
        rows.append({
            "name": name, "device": device.lower(), "type": type_of.get(name) or re.match(r"_*([A-Za-z]*)", name).group(1) or name,
            "used": _total(st.get("real_memory_size", [])),
            "reserved": _total(st.get("reserved_memory_size", [])),
            "max_sample": max([v for v in st.get("max_real_memory_size", []) if v < UNSET] or [0]),
        })
    rows.sort(key=lambda r: (-r["reserved"], r["name"]))
    return rows


def memory_table(rows: List[dict], top: int = 20) -> str:
    by_type = defaultdict(lambda: [0, 0, 0])
    for r in rows:
        t = by_type[(r["type"], r["device"])]
        t[0] += 1
        t[1] += r["used"]
        t[2] += r["reserved"]
    lines = [f"  memory by operator type ({len(rows)} operators with statistics):",
             f"    {'reserved':>11s} {'used':>11s} {'ops':>5s}  type"]
    for (typ, dev), (n, used, res) in sorted(by_type.items(), key=lambda kv: -kv[1][2])[:top]:
        lines.append(f"    {_bytes(res):>11s} {_bytes(used):>11s} {n:5d}  {typ} ({dev})")
    lines.append(f"  top {min(top, len(rows))} operators by reserved memory:")
    lines.append(f"    {'reserved':>11s} {'used':>11s} {'max sample':>11s}  operator")
    for r in rows[:top]:
        lines.append(f"    {_bytes(r['reserved']):>11s} {_bytes(r['used']):>11s} "
                     f"{_bytes(r['max_sample']):>11s}  {r['name']} ({r['type']}, {r['device']})")
    total_res = sum(r["reserved"] for r in rows)
    total_used = sum(r["used"] for r in rows)
    lines.append(f"  total: {_bytes(total_res)} reserved, {_bytes(total_used)} used")
    return "\n".join(lines)


def run_with_stats(pipe, *, iters: int, batch_size: int, device: str, type_of=None) -> str:
    """Run ``iters`` batches (after one warm-up) of a pipeline built with the statistics options;
    returns the report."""
    if iters < 1:
        raise UserError("--iters must be >= 1")
    if type_of is None:
        from ._ops import op_nodes
        type_of = {n.name: n.type for n in op_nodes(pipe)}
    pipe.build()
    pipe.run()
    start = time.perf_counter()
    for _ in range(iters):
        pipe.run()
    took = time.perf_counter() - start
    stats = pipe.executor_statistics()
    rows = memory_rows(stats, type_of)
    head = [f"executor statistics (device {device}, batch {batch_size}; DALI exec_dynamic=False, "
            f"enable_memory_stats=True):",
            f"  time: {iters} batches in {took:.2f} s = {took / iters:.3f} s/batch "
            f"({iters * batch_size / took:.1f} samples/s), measured around pipe.run()",
            "  per-operator time: not in DALI's executor statistics; profile with Nsight Systems "
            "(`nsys profile -t nvtx,cuda python ...`): DALI marks each operator run with an NVTX range"]
    if not rows:
        return "\n".join(head + ["  memory: DALI returned no statistics for this pipeline"])
    return "\n".join(head + [memory_table(rows)])
