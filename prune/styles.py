"""One look per method, the same in every figure: a colour and a marker from one table (``METHOD_STYLES``).

Colours and markers are both distinct, so two methods differ even in grey print. Methods not in the table
(a new one, before its row is added) and grid variants (``blockpruner[search=false]``) get styles that no
other label of the same figure has: a variant keeps its method's marker, with a spare colour of its own
(variants are compared with each other, side by side) and a dashed line; an unknown name takes the next
unused colour-marker pair.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Style:
    """How one method is drawn: line and marker colour, marker, line style."""

    color: str
    marker: str
    linestyle: str = "-"


DENSE = "dense"
DENSE_STYLE = Style("black", "o")  # drawn as a horizontal reference line, not as a curve

# Grouped by kind, so that related methods sit together in legends: layer removal, its naive baselines
# (greys), block removal, width pruning, unstructured sparsity. Order here is legend order.
METHOD_STYLES: dict[str, Style] = {
    DENSE: DENSE_STYLE,
    "shortgpt": Style("#1f77b4", "o"),
    "relative_magnitude": Style("#17becf", "s"),
    "laco": Style("#8c564b", "^"),
    "shortened_llama": Style("#bcbd22", "v"),
    "elder": Style("#9467bd", "P"),
    "last_layers": Style("#555555", "<"),
    "random_layers": Style("#999999", ">"),
    "sleb": Style("#d62728", "D"),
    "blockpruner": Style("#2ca02c", "*"),
    "disp": Style("#ff7f0e", "X"),
    "slicegpt": Style("#e377c2", "h"),
    "llm_pruner": Style("#000080", "p"),
    "flap": Style("#008080", "d"),
    "wanda_sp": Style("#8b0000", "H"),
    "wanda": Style("#c51b8a", "8"),
    "sparsegpt": Style("#66a61e", "s"),
    "magnitude": Style("#b8860b", "o"),
}

# For names the table does not know: colours none of the table's use, then every colour-marker pair.
SPARE_COLORS = ("#4b0082", "#ff1493", "#556b2f", "#1e90ff", "#a0522d", "#00ced1", "#808000", "#dc143c")
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h", "p", "d", "<", ">", "H", "8")


def base_method(label: str) -> str:
    """The method of a row label: ``blockpruner[search=false]`` or ``disp †untrained`` -> the method."""
    return label.split("[", 1)[0].split(" ", 1)[0]


def legend_order(label: str) -> tuple[int, str]:
    """Sort key: the table's order, variants after their method, unknown names last (alphabetically)."""
    order = list(METHOD_STYLES)
    base = base_method(label)
    return (order.index(base) if base in order else len(order), label)


def styles_for(labels: Iterable[str]) -> dict[str, Style]:
    """A style for each label, no two alike: the table's for known methods, fresh ones for the rest."""
    labels = sorted(set(labels), key=legend_order)
    styles = {label: METHOD_STYLES[label] for label in labels if label in METHOD_STYLES}
    taken = {(s.color, s.marker) for s in METHOD_STYLES.values()}
    for label in labels:
        if label not in styles:
            base = METHOD_STYLES.get(base_method(label))  # a variant: its method's marker, dashed
            styles[label] = _fresh(taken, base.marker if base else None, "--" if base else "-")
            taken.add((styles[label].color, styles[label].marker))
    return styles


def _fresh(taken: set[tuple[str, str]], marker: str | None, linestyle: str) -> Style:
    """A style not in `taken`: a spare colour nobody uses yet if one is left (with `marker`, or a marker
    that changes from one label to the next), else any free colour-marker pair."""
    used_colors = {color for color, _ in taken}
    colors = [c for c in SPARE_COLORS if c not in used_colors] + [*SPARE_COLORS, *sorted(used_colors)]
    turn = len(taken) % len(MARKERS)
    markers = ([marker] if marker else []) + list(MARKERS[turn:] + MARKERS[:turn])
    color, chosen = next((c, m) for c in colors for m in markers if (c, m) not in taken)
    return Style(color, chosen, linestyle)
