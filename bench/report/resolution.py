"""The run's noise, resolution and stopping in words: the lines every report prints the same."""

from __future__ import annotations

from typing import Any

from bench.judge.components import Components


def resolution_lines(verdict: dict[str, Any]) -> list[str]:
    """The variance components in one line, what they resolve, and what the stopping rule
    did; nothing for what the run lacks."""
    lines = []
    if verdict.get("components"):
        lines.append(Components(**verdict["components"]).line())
    found = verdict.get("resolution")
    if found:
        lines.append(
            f"resolution: this run's noise detects {found['mde_single_pct']:.2f}% for one "
            f"transform and {found['mde_interaction_pct']:.2f} pp for the interaction (95% "
            "confidence, 80% power)"
        )
    sequential = verdict.get("sequential")
    if sequential and sequential.get("enabled"):
        looks = ", ".join(
            f"after {look['processes']}: {look['outcome']}" for look in sequential["looks"]
        )
        if sequential["decided_after"]:
            ended = f"stopped when decided after {sequential['decided_after']} processes"
        else:
            ended = f"ran all {sequential['processes_measured']} processes"
        lines.append(
            f"stopping rule: looks planned after {sequential['look_points']} of "
            f"{sequential['planned_processes']} processes ({looks or 'none taken'}); {ended}; "
            f"the residual is stated at {sequential['confidence']:.1%} confidence (alpha "
            "spending keeps the rule's error at 5%)"
        )
    return lines
