"""The book's look, in one place: a colour per branch and per layer, the marks of highlighted feature
sets, and the label every figure made with random weights carries."""

from __future__ import annotations

BRANCH_COLOURS = {"1x1": "#4C78A8", "3x3": "#F58518", "5x5": "#54A24B", "pool": "#B279A2"}
NOT_A_RESULT = "RANDOM WEIGHTS: NOT A RESULT"
LAYER_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]  # lines of mixed4a, 4b, ...


# the hue names of labels.HUES as marker colours: a set named "colour: blue" is drawn blue
HUE_COLOURS = {"red": "#d92121", "orange": "#d97d21", "yellow": "#ccbe1f", "green": "#21b021", "cyan": "#21c4d9",
               "blue": "#213fd9", "purple": "#9b21d9", "magenta": "#d9219b"}  # each at the middle of its hue


# other sets: colours no hue name claims, told apart by their symbols too
_NEUTRAL = [("black", "diamond"), ("#8c564b", "star"), ("#555555", "square"), ("#2f4f4f", "cross"),
            ("#7f7f7f", "triangle-up")]


def highlight_style(name: str, k: int) -> dict:
    """Marker of the ``k``-th highlighted set: the named hue for "colour: NAME" sets (a circle),
    else a neutral colour and a symbol of its own."""
    hue = name.split(":", 1)[1].strip() if name.startswith("colour:") else None
    if hue in HUE_COLOURS:
        return dict(color=HUE_COLOURS[hue], symbol="circle")
    colour, symbol = _NEUTRAL[k % len(_NEUTRAL)]
    return dict(color=colour, symbol=symbol)
