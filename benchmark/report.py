"""Summary statistics against the users' targets, the JSON report, the table and the plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from benchmark.config import WIZARD_BASE, WIZARD_PROFILE, WIZARD_PROFILE_FROM_BASE

# The users' targets (their epic), on all_images_ms: (p50, p95) in seconds.
TARGETS_S: dict[str, tuple[float, float]] = {
    WIZARD_BASE: (10.0, 25.0),  # 3 base images, submitted concurrently
    WIZARD_PROFILE: (60.0, 120.0),  # 8 profile pictures in one job
    WIZARD_PROFILE_FROM_BASE: (60.0, 120.0),  # the same 8, as variations of the chosen base image
}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: with few runs it reports a real run)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per permutation: p50/p95 of first and all images; failed runs count as infinitely slow."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(record["permutation"], []).append(record)
    rows = []
    for key, runs in groups.items():
        all_s = [r["all_images_ms"] / 1000 if r["ok"] else math.inf for r in runs]
        first_s = [r["first_image_ms"] / 1000 if r["first_image_ms"] is not None else math.inf for r in runs]
        row: dict[str, Any] = {
            "permutation": key,
            "scenario": runs[0]["scenario"],
            "runs": len(runs),
            "failed_runs": sum(1 for r in runs if not r["ok"]),
            "first_image_p50_s": percentile(first_s, 50),
            "all_images_p50_s": percentile(all_s, 50),
            "all_images_p95_s": percentile(all_s, 95),
            "target": None,
            "meets_target": None,
        }
        target = TARGETS_S.get(row["scenario"])
        if target is not None:
            row["target"] = {"p50_s": target[0], "p95_s": target[1]}
            row["meets_target"] = row["all_images_p50_s"] < target[0] and row["all_images_p95_s"] < target[1]
        rows.append(row)
    return rows


def _json_safe(value: Any) -> Any:
    """JSON has no infinity: failed-run percentiles are written as null."""
    if isinstance(value, float) and math.isinf(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_report(path: Path, report: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(report), indent=2))
    return path


def format_table(rows: list[dict[str, Any]], skipped: list[dict[str, str]]) -> str:
    def sec(value: float) -> str:
        return "failed" if math.isinf(value) else f"{value:.2f}"

    lines = [f"{'permutation':<64} {'runs':>4} {'fail':>4} {'first p50':>9} {'all p50':>8} {'all p95':>8}  target"]
    for row in rows:
        verdict = "-"
        if row["target"] is not None:
            verdict = (f"{'PASS' if row['meets_target'] else 'MISS'} "
                       f"(p50<{row['target']['p50_s']:g}s p95<{row['target']['p95_s']:g}s)")
        lines.append(
            f"{row['permutation']:<64} {row['runs']:>4} {row['failed_runs']:>4} "
            f"{sec(row['first_image_p50_s']):>9} {sec(row['all_images_p50_s']):>8} "
            f"{sec(row['all_images_p95_s']):>8}  {verdict}"
        )
    for skip in skipped:
        lines.append(f"SKIPPED {skip['permutation']}: {skip['reason']}")
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: Path) -> Path:
    """One row per permutation: every run's all-images latency, with the target lines if any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(r["permutation"] for r in records))
    fig, ax = plt.subplots(figsize=(10, 1.0 + 0.45 * len(keys)))
    for y, key in enumerate(keys):
        runs = [r for r in records if r["permutation"] == key]
        ok = [r["all_images_ms"] / 1000 for r in runs if r["ok"]]
        firsts = [r["first_image_ms"] / 1000 for r in runs if r["first_image_ms"] is not None]
        ax.scatter(ok, [y] * len(ok), marker="o", color="tab:blue", label="all images" if y == 0 else None)
        ax.scatter(
            firsts, [y - 0.2] * len(firsts), marker="|", color="tab:green", label="first image" if y == 0 else None
        )
        target = TARGETS_S.get(runs[0]["scenario"])
        if target is not None:
            for value, style in zip(target, ("--", ":")):
                ax.plot([value, value], [y - 0.4, y + 0.4], linestyle=style, color="tab:red")
    ax.set_yticks(range(len(keys)), keys, fontsize=7)
    ax.set_xlabel("seconds from submission (red: target p50 dashed, p95 dotted)")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
