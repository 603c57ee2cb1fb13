"""What applying a models file would do, or did: the report, and how people read it.

``corral plan`` / ``corral apply`` print it (``cluster/cli_plan.py``); the dashboard
gets ``report_view``, the same lines as a ``PlanView`` record.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.planner import Change, Placement, Plan, describe_placement
from deployments.views import PlanChange, PlanView, Unplaced

NO_CHANGES = "No changes: the cluster already runs what the file declares."


@dataclass(frozen=True)
class PlanReport:
    """What applying a models file would do (``corral plan``), or did (``corral apply``)."""

    plan: Plan
    changes: list[Change]
    unchanged: list[Placement]
    failed: dict[str, str] = field(default_factory=dict)  # "model on node" -> why it did not load


def label(p: Placement) -> str:
    return f"{p.model} on {p.node}"


def change_detail(change: Change) -> str:
    """What a change does to its placement, after "OP MODEL on NODE: "."""
    if change.op == "~":
        return change.describe().split(": ", 1)[1] + (" (reloads)" if change.reload else "")
    if change.op == "+":
        return describe_placement(change.placement)
    return "stops"


def counts(report: PlanReport, *, past: bool = False) -> str:
    """ "1 to add, 0 to change, 2 to remove" (``past``: "1 added, ..."), failures apart."""
    words = ("added", "changed", "removed") if past else ("to add", "to change", "to remove")
    done = [
        sum(c.op == op and label(c.placement) not in report.failed for c in report.changes)
        for op in ("+", "~", "-")
    ]
    text = ", ".join(f"{n} {w}" for n, w in zip(done, words, strict=True))
    if report.failed:
        text += f", {len(report.failed)} failed"
    return text


def report_view(report: PlanReport, *, applied: bool = False) -> PlanView:
    """The report as the dashboard shows it: ``corral plan``'s lines, as a record."""
    changes = [
        PlanChange(
            op=c.op,
            model=c.placement.model,
            node=c.placement.node,
            detail=change_detail(c),
            reason=c.placement.reason if c.op == "+" else None,
            reload=c.reload,
            failed=report.failed.get(label(c.placement)),
        )
        for c in report.changes
    ]
    if not report.changes:
        summary = NO_CHANGES
    elif applied:
        summary = f"{'Applied with failures' if report.failed else 'Applied'}: " + counts(
            report, past=True
        )
    else:
        summary = f"Plan: {counts(report)}."
    return PlanView(
        changes=changes,
        unchanged=[label(p) for p in report.unchanged],
        unplaced=[
            Unplaced(model=u.model, wanted=u.wanted, placed=u.placed, reason=u.reason)
            for u in report.plan.unplaced
        ],
        notes=list(report.plan.notes),
        summary=summary,
    )
