"""
Turns the ``RESULT measure|row|value|unit`` lines the suite's scripts write into one table: for
each measure, every row (gateway, stock Twisted proxy, hello-world, nginx, HAProxy, ... as they
were measured) with its value, its baseline from the same run (rows carrying an interpreter
label, e.g. ``gateway (PyPy)``, are compared with the baseline of the same label when there is
one), the ratio or difference, and for the gateway's rows the issue's target and PASS/MISS.
A ratio of two rows ``run.sh`` measured in the same rounds (it writes each round's figures as
``<measure>_runs``) is the median of the rounds' ratios, each taken from two runs seconds apart;
otherwise it is the ratio of the two values (the rows' medians). In the same way a difference of
two rows ``sse.py`` measured in the same rounds is the median of the rounds' differences.

With ``--check``, also tells whether each judged figure is at least half as good as its target
(the CI threshold for a gross regression): at least half the target ratio for throughput figures,
at most twice the target value for delays (a target of "direct + 0.5 ms" fails above
2 x (direct + 0.5 ms)), at most twice the memory, at least half the connections. It prints each
figure that is not, and exits 1 if any is not.

usage: summary.py RESULTS-FILE [--check]
"""

from __future__ import annotations

import sys
from statistics import median
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple


class Measure(NamedTuple):
    key: str  # the RESULT measure
    title: str
    baseline: Optional[str]  # row compared with; None for absolute figures
    mode: str  # "ratio" (value / baseline), "diff" (value - baseline) or "abs"
    judged: Tuple[str, ...]  # rows (before any label) the target applies to
    target: str  # human text
    passes: Optional[Callable[[float], bool]]  # on the ratio / difference / value
    # Half as good as the target (a gross regression), from the figure and the baseline's value.
    ci_fails: Optional[Callable[[float, float], bool]]
    ci_text: str
    # The same four for the "(PyPy)" rows where the issue sets PyPy its own target.
    pypy: Optional[Tuple[str, Callable[[float], bool], Callable[[float, float], bool], str]] = None


def reported(key: str, title: str, baseline: str, mode: str) -> Measure:
    """A figure shown beside its baseline, with no target."""
    return Measure(key, title, baseline, mode, (), "", None, None, "")


MEASURES = [
    Measure(
        "throughput_rps",
        "throughput req/s, wrk -c50",
        "hello",
        "ratio",
        ("gateway",),
        ">= 0.6x hello-world",
        lambda r: r >= 0.6,
        lambda r, _b: r < 0.3,
        "< 0.3x hello-world",
        (">= 0.5x hello-world", lambda r: r >= 0.5, lambda r, _b: r < 0.25, "< 0.25x hello-world"),
    ),
    Measure(
        "throughput_rps",
        "middleware chain req/s",
        "gateway",
        "ratio",
        ("chain",),
        ">= 0.85x gateway (cost <= 15%)",
        lambda r: r >= 0.85,
        lambda r, _b: r < 0.425,
        "< 0.425x gateway",
    ),
    Measure(
        "throughput_rps",
        "observability on req/s",
        "gateway",
        "ratio",
        ("observed",),
        "",
        None,
        None,
        "",
    ),
    Measure(
        "latency_p50",
        "latency p50 ms, wrk -c1",
        "backend",
        "diff",
        ("gateway",),
        "<= direct + 0.5 ms",
        lambda d: d <= 0.5,
        lambda d, direct: d > direct + 1.0,
        "> 2 x (direct + 0.5 ms)",
    ),
    Measure(
        "sse_lost",
        "SSE streams lost",
        None,
        "abs",
        ("gateway",),
        "0",
        lambda v: v == 0,
        lambda v, _b: v > 0,
        "> 0",
    ),
    reported("sse_delay_p50", "SSE per-event delay p50 ms", "direct", "diff"),
    Measure(
        "sse_delay_p99",
        "SSE per-event delay p99 ms",
        "direct",
        "diff",
        ("gateway",),
        "<= direct + 5 ms",
        lambda d: d <= 5,
        lambda d, direct: d > direct + 10,
        "> 2 x (direct + 5 ms)",
    ),
    Measure(
        "sse_ttfe_p50",
        "SSE first event p50 ms, 64 streams",
        "nginx-unbuffered",
        "diff",
        ("gateway",),
        "<= nginx + 2 ms",
        lambda d: d <= 2,
        lambda d, nginx: d > nginx + 4,
        "> 2 x (nginx + 2 ms)",
    ),
    reported(
        "sse_ttfe_pinned_p50",
        "SSE first event p50 ms, 64 streams, proxy on its own CPU",
        "nginx-unbuffered",
        "diff",
    ),
    reported("sse_ttfe_p99", "SSE first event p99 ms, 64 streams", "nginx-unbuffered", "diff"),
    Measure(
        "slow_growth",
        "slow client: RSS growth MB",
        None,
        "abs",
        ("gateway",),
        "< 20 MB",
        lambda v: v < 20,
        lambda v, _b: v > 40,
        "> 40 MB",
    ),
    Measure(
        "idle_held",
        "idle connections held",
        "idle_wanted",
        "ratio",
        ("gateway",),
        "all held",
        lambda r: r >= 1.0,
        lambda r, _b: r < 0.5,
        "< half held",
    ),
    reported("idle_kib_per_conn", "idle: KiB per connection", "hello", "ratio"),
]


def split_label(row: str) -> Tuple[str, str]:
    """``"gateway (PyPy)"`` -> ``("gateway", " (PyPy)")``."""
    if row.endswith(")") and " (" in row:
        i = row.index(" (")
        return row[:i], row[i:]
    return row, ""


Values = Dict[Tuple[str, str], float]
Rounds = Dict[Tuple[str, str], List[float]]


def load(path: str) -> Tuple[Values, Dict[str, List[str]], Rounds]:
    """The values, the rows of each measure in order, and the rounds' figures (``_runs``)."""
    values: Values = {}
    rows: Dict[str, List[str]] = {}
    rounds: Rounds = {}
    with open(path) as results:
        for line in results:
            if not line.startswith("RESULT "):
                continue
            measure, row, value, _unit = line[7:].rstrip("\n").split("|")
            try:
                if measure.endswith("_runs"):
                    rounds[(measure, row)] = [float(v) for v in value.split()]
                    continue
                values[(measure, row)] = float(value)
            except ValueError:
                continue
            rows.setdefault(measure, [])
            if row not in rows[measure]:
                rows[measure].append(row)
    return values, rows, rounds


def _paired_runs(
    rounds: Rounds, measure: str, row: str, base_row: str
) -> Optional[Tuple[List[float], List[float]]]:
    """
    The rounds' figures of C{row} and C{base_row} for C{measure} when both were recorded (the
    same number of them): C{<x>_runs} for a C{<x>_rps} measure (run.sh), C{<measure>_runs}
    otherwise (sse.py); None when not.
    """
    if measure.endswith("_rps"):
        key = measure[: -len("_rps")] + "_runs"
    else:
        key = measure + "_runs"
    mine, base = rounds.get((key, row)), rounds.get((key, base_row))
    if not mine or not base or len(mine) != len(base):
        return None
    return mine, base


def paired_ratio(rounds: Rounds, measure: str, row: str, base_row: str) -> Optional[float]:
    """
    The median of the per-round ratios of C{row} to C{base_row} for a C{<x>_rps} measure whose
    rounds were recorded for both rows (the same number of them); None otherwise.
    """
    if not measure.endswith("_rps"):
        return None
    runs = _paired_runs(rounds, measure, row, base_row)
    if runs is None or not all(runs[1]):
        return None
    return median(a / b for a, b in zip(*runs))


def paired_difference(rounds: Rounds, measure: str, row: str, base_row: str) -> Optional[float]:
    """
    The median of the per-round differences of C{row} and C{base_row} when the rounds of both
    were recorded (the same number of them); None otherwise.
    """
    runs = _paired_runs(rounds, measure, row, base_row)
    if runs is None:
        return None
    return median(a - b for a, b in zip(*runs))


def main(argv: List[str]) -> int:
    values, rows, rounds = load(argv[1])
    check = "--check" in argv
    out = [("measure", "row", "value", "baseline", "ratio/diff", "target", "verdict")]
    regressions: List[str] = []
    for m in MEASURES:
        for row in rows.get(m.key, []):
            name, label = split_label(row)
            if m.key == "throughput_rps":
                # The chain and observability lines show only their own row; the main line the rest.
                if m.title.startswith("throughput"):
                    if name in ("chain", "observed"):
                        continue
                elif name not in m.judged:
                    continue
            value = values[(m.key, row)]
            base_value: Optional[float] = None
            base_row = ""
            base_text = "-"
            if m.baseline is not None:
                base_measure = "idle_wanted" if m.baseline == "idle_wanted" else m.key
                base_row_name = row if m.baseline == "idle_wanted" else m.baseline
                for candidate in (
                    (base_measure, base_row_name + label),
                    (base_measure, base_row_name),
                ):
                    if candidate in values and m.baseline != "idle_wanted":
                        base_value = values[candidate]
                        base_row = candidate[1]
                        base_text = f"{base_row} {base_value:.2f}"
                        break
                    if candidate in values:
                        base_value = values[candidate]
                        base_text = f"{base_value:.0f} opened"
                        break
            if m.mode == "abs":
                figure: Optional[float] = value
                fig_text = "-"
            elif base_value is None:
                figure, fig_text = None, "-"
            elif m.mode == "ratio":
                figure = paired_ratio(rounds, m.key, row, base_row)
                if figure is None:
                    figure = value / base_value if base_value else None
                fig_text = f"{figure:.3f}x" if figure is not None else "-"
            else:
                figure = paired_difference(rounds, m.key, row, base_row)
                if figure is None:
                    figure = value - base_value
                fig_text = f"{figure:+.2f}"
            verdict, target = "", ""
            if name in m.judged and m.passes is not None:
                target, passes, ci_fails, ci_text = m.target, m.passes, m.ci_fails, m.ci_text
                if label == " (PyPy)" and m.pypy is not None:
                    target, passes, ci_fails, ci_text = m.pypy
                if figure is None:
                    verdict = "no baseline"
                else:
                    verdict = "PASS" if passes(figure) else "MISS"
                    if ci_fails is not None and ci_fails(figure, base_value or 0.0):
                        regressions.append(
                            f"{m.title} [{row}]: "
                            f"{fig_text if m.mode != 'abs' else value} ({ci_text})"
                        )
            out.append((m.title, row, f"{value:.2f}", base_text, fig_text, target, verdict))
    widths = [max(len(r[i]) for r in out) for i in range(len(out[0]))]
    for i, r in enumerate(out):
        print("| " + " | ".join(c.ljust(widths[j]) for j, c in enumerate(r)) + " |")
        if i == 0:
            print("| " + " | ".join("-" * w for w in widths) + " |")
    if check:
        print()
        if regressions:
            for regression in regressions:
                print(f"GROSS REGRESSION (not half as good as the target): {regression}")
            return 1
        print("ci-check: every figure at least half as good as its target")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
