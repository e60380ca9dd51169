"""The arithmetic of the performance-against-compression comparison (``ktm pareto``).

Pure functions on numbers, so each is checked by hand-made cases:

* :func:`length_reduction`: ``1 - (LLM positions) / (prompt tokens)``, summed over a set;
* :func:`normalised_performance`: a method's metric relative to ``plain`` (K = 1), so that
  1.0 means "as good as reading the whole prompt" whatever the metric;
* :func:`p_lf1`: ktm's P-LF1, the harmonic mean of normalised performance and length
  reduction (the paper names the score but does not publish its formula; docs/RESULTS.md);
* :func:`above_majority`: accuracy normalised between the majority class (0) and ``plain``
  (1), so a model that always answers the majority class scores 0, not ~0.9;
* :func:`pareto_front`: which points no other point beats on both axes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: metrics where a larger value is better; the others (perplexity) are better when smaller
HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "exact_match": True, "chrf": True, "perplexity": False}


def length_reduction(prompt_tokens: Sequence[int], positions: Sequence[int]) -> float:
    """``1 - sum(positions) / sum(prompt_tokens)``: the share of the LLM's input positions
    that compression removes over a set of prompts (0 for plain reading, 0.75 for K = 4 on
    long prompts).

    >>> length_reduction([8, 4], [2, 1])
    0.75
    >>> length_reduction([5], [5])
    0.0
    """
    if len(prompt_tokens) != len(positions) or not prompt_tokens:
        raise ValueError("length_reduction needs equally many prompt lengths and position counts, at least one")
    total = sum(prompt_tokens)
    if total <= 0 or any(n < 0 for n in prompt_tokens) or any(p < 0 for p in positions):
        raise ValueError("prompt lengths and position counts must be >= 0, with at least one token")
    return 1.0 - sum(positions) / total


def normalised_performance(value: float, plain_value: float, metric: str) -> float:
    """``value / plain_value`` for a metric where larger is better (accuracy, chrF),
    ``plain_value / value`` where smaller is better (perplexity): 1.0 equals ``plain``,
    below 1.0 is worse, above 1.0 better.

    >>> normalised_performance(0.6, 0.8, "accuracy")
    0.7499999999999999
    >>> normalised_performance(4.0, 2.0, "perplexity")
    0.5
    """
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown metric {metric!r}; known: {sorted(HIGHER_IS_BETTER)}")
    if not (math.isfinite(value) and math.isfinite(plain_value)) or value < 0 or plain_value <= 0:
        raise ValueError(f"cannot normalise {metric} {value} by plain's {plain_value}")
    if HIGHER_IS_BETTER[metric]:
        return value / plain_value
    if value == 0:
        raise ValueError("a perplexity of 0 is impossible")
    return plain_value / value


def above_majority(value: float, plain_value: float, majority_rate: float) -> float | None:
    """``(value - majority) / (plain - majority)``, at least 0: the share of ``plain``'s gain
    over always answering the majority class that a method keeps. None when ``plain`` is not
    above the majority class (nothing to share).

    >>> above_majority(0.6, 0.8, 0.6), round(above_majority(0.7, 0.8, 0.6), 6), above_majority(0.5, 0.8, 0.6)
    (0.0, 0.5, 0.0)
    """
    if plain_value <= majority_rate:
        return None
    return max(0.0, (value - majority_rate) / (plain_value - majority_rate))


def p_lf1(performance: float, reduction: float) -> float:
    """ktm's P-LF1: the harmonic mean ``2 P R / (P + R)`` of normalised performance ``P``
    (:func:`normalised_performance`) and length reduction ``R`` (:func:`length_reduction`).

    It is 0 when either is 0 (``plain`` reduces nothing; a method that loses all
    performance gains nothing) and 1 only for ``P = R = 1``. ``P`` is not capped: a method
    better than ``plain`` can score above what its reduction alone allows.

    >>> p_lf1(1.0, 0.75)
    0.8571428571428571
    >>> p_lf1(1.0, 0.0)
    0.0
    """
    if performance < 0 or not 0 <= reduction <= 1:
        raise ValueError(f"P-LF1 needs performance >= 0 and reduction in [0, 1], got {performance}, {reduction}")
    if performance + reduction == 0:
        return 0.0
    return 2 * performance * reduction / (performance + reduction)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For points ``(reduction, performance)``, both better when larger: whether each is on
    the Pareto frontier, i.e. no other point is at least as good on both and better on one.
    Equal points are all on it.

    >>> pareto_front([(0.0, 0.9), (0.5, 0.8), (0.5, 0.7), (0.75, 0.8)])
    [True, False, False, True]
    """
    def dominated(i: int) -> bool:
        r, p = points[i]
        return any(r2 >= r and p2 >= p and (r2 > r or p2 > p) for j, (r2, p2) in enumerate(points) if j != i)

    return [not dominated(i) for i in range(len(points))]
