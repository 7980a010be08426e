"""Several processes' `/metrics` pages as one (`--frontends N`: the supervisor serves
the sum of its frontends').

Every frontend counts what it served itself (its RPCs, requests, stream slots, its
classifiers' batches); a step model's engine, shared by all of them, reports its
counters, observations and gauges to one frontend only (`serving.remote.host`). So each
sample summed over the pages counts everything once, histograms included (buckets,
sums and counts add). The machine's own gauges (CPU, memory) are the same whoever reads
them: those come from the first page.

A frontend that exits takes its counts with it, and a sum that went down would read to
Prometheus as a counter reset (`rate()` would count everything again). So the last page
of a process that is gone (or did not answer) is passed as `carried`: its counters and
histograms stay in the sum, its gauges do not.
"""

from __future__ import annotations

MACHINE_WIDE = frozenset(
    ("nv_cpu_utilization", "nv_cpu_memory_total_bytes", "nv_cpu_memory_used_bytes")
)


CUMULATIVE = frozenset(("counter", "histogram", "summary"))


class _Family:
    def __init__(self):
        self.comments: list[str] = []  # HELP and TYPE, as the first page wrote them
        self.samples: dict[str, list[str]] = {}  # name{labels} -> its values, page by page
        self.type = "untyped"


def merge(pages: list[str], carried: list[str] = ()) -> str:
    """One page in the Prometheus text format: each family once, in the order first
    seen, with its HELP and TYPE; each sample (name and labels) summed over the pages,
    or, for MACHINE_WIDE, the first page's; plus the counters and histograms of the
    `carried` pages (the last of processes that are gone)."""
    families: dict[str, _Family] = {}
    for page, cumulative_only in [*((p, False) for p in pages), *((p, True) for p in carried)]:
        family = families.setdefault("", _Family())  # samples before any comment
        for line in page.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = families.setdefault(parts[2], _Family())
                    if parts[1] == "TYPE" and len(parts) == 4:
                        family.type = parts[3].strip()
                if line not in family.comments:
                    family.comments.append(line)
                continue
            if cumulative_only and family.type not in CUMULATIVE:
                continue
            key, _, value = line.rpartition(" ")
            values = family.samples.setdefault(key, [])
            if not values or key.split("{", 1)[0] not in MACHINE_WIDE:
                values.append(value)
    out = []
    for family in families.values():
        out.extend(family.comments)
        out.extend(f"{key} {_sum(values)}" for key, values in family.samples.items())
    return "\n".join(out) + "\n"


def _sum(values: list[str]) -> str:
    """Integers stay integers ("3"), anything else adds as floats."""
    try:
        return str(sum(int(v) for v in values))
    except ValueError:
        return repr(sum(float(v) for v in values))
