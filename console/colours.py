"""Stable run colours: a run keeps its colour in every chart and table, whatever else is overlaid."""

PALETTE = ("#4fc1ff", "#ffb454", "#7fd962", "#f07178", "#c792ea", "#ffd580", "#95e6cb", "#ff8f40")


def run_colour(run_id: int) -> str:
    return PALETTE[run_id % len(PALETTE)]
