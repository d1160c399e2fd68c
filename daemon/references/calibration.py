"""The false-reject bound behind every calibrated threshold, and the stored calibration rows.

`frr_bound(values, rate)` turns scores of known-good frames the bank has not seen into a threshold that good frames
exceed with probability `rate` (the target false-reject rate):

- **Enough frames** (n >= `good_frames_needed(rate, confidence)`): distribution-free. For continuous scores the
  false-reject rate of the k-th largest of n known-good scores is Beta(k, n + 1 - k) distributed, so
  P(FRR > rate) = P(Binomial(n, rate) <= k - 1). The threshold is the k-th largest score with the largest k that
  keeps that probability <= 1 - `confidence`. Sound at any n, whatever the score distribution.
- **Too few frames** for that: no order statistic of n frames reaches a `rate` quantile with that confidence, so the
  threshold is extrapolated: the larger of the maximum and an exponential tail fitted above the upper quartile of
  z = -ln(1 - score) (q75 + mean excess over q75 · ln(0.25 / rate), mapped back to 0–1; for PatchCore z is the
  distance in units of d0). This is the "maximum plus a documented margin"; it assumes a tail no heavier than
  exponential, and a WARNING says how many frames the target needs.

`DEFAULT_CONFIDENCE` = 0.5 makes the threshold median-unbiased (its realised false-reject rate is as likely above
the target as below): a 0.5 % target needs 139 known-good frames, 1 % needs 69; at 0.9 they need 460 and 230.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger("anomalyd.calibration")

DEFAULT_CONFIDENCE = 0.5
TAIL_FROM = 0.75  # the extrapolated tail starts at this quantile of the known-good scores


@dataclass(frozen=True)
class Bound:
    """A threshold and how it was derived (the `rule` goes into the threshold history)."""

    value: float
    rule: str
    n: int
    needed: int
    extrapolated: bool


def floored(bound: Bound, floor: float | None) -> Bound:
    """`bound` raised to `floor` (a family's decision boundary, `Capabilities.threshold_floor`) when below it, the
    rule saying so; unchanged when the family declares no floor."""
    if floor is None or bound.value >= floor:
        return bound
    return Bound(floor, f"{bound.rule}; raised from {bound.value:.4g} to the model's decision boundary {floor:g} "
                 "(its known-good frames are frames it learned from)", bound.n, bound.needed, bound.extrapolated)


def good_frames_needed(rate: float, confidence: float = DEFAULT_CONFIDENCE) -> int:
    """Known-good frames for a distribution-free bound: the smallest n with P(FRR(max of n) > rate) <= 1 - conf."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"false-reject rate must be between 0 and 1, not {rate}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")
    return math.ceil(math.log(1.0 - confidence) / math.log(1.0 - rate))


def _order_statistic_k(n: int, rate: float, confidence: float) -> int:
    """The largest k with P(Binomial(n, rate) <= k - 1) <= 1 - confidence (0 when even the maximum fails)."""
    from scipy import stats

    k = 0
    while k < n and stats.binom.cdf(k, n, rate) <= 1.0 - confidence:
        k += 1
    return k


def frr_bound(values: Sequence[float], rate: float, confidence: float = DEFAULT_CONFIDENCE) -> Bound:
    """A 0–1 threshold that known-good values exceed with probability `rate` (see the module docstring)."""
    data = np.sort(np.asarray(values, np.float64))[::-1]  # largest first
    n = int(data.size)
    needed = good_frames_needed(rate, confidence)
    if n == 0:
        raise ValueError("no known-good scores to calibrate on")
    k = _order_statistic_k(n, rate, confidence)
    if k >= 1:
        return Bound(float(data[k - 1]), f"{k}-th largest of {n} known-good scores (P(FRR > {rate:g}) <= "
                     f"{1 - confidence:g}, distribution-free)", n, needed, False)
    top = float(data[0])
    # The tail is fitted on z = -ln(1 - score): the 0–1 scale's 1 - exp(-d / d0) undone for PatchCore (z = d / d0),
    # unbounded, so the extrapolation never reaches the scale's cap of 1.
    z = -np.log1p(-np.clip(data, 0.0, 1.0 - 1e-9))
    tail_z = float(z[0])
    if n >= 2:
        q = float(np.quantile(z, TAIL_FROM))
        excess = z[z > q] - q
        if excess.size:
            tail_z = max(tail_z, q + float(excess.mean()) * math.log((1.0 - TAIL_FROM) / rate))
    value = max(top, float(-np.expm1(-tail_z)))
    return Bound(value, f"max of {n} known-good scores with an exponential-tail margin (+{value - top:.4f}); "
                 f"{needed} frames needed for a distribution-free bound at {rate:g}", n, needed, True)


def upper_bound(values: Sequence[float], false_reject_rate: float) -> float:
    """`frr_bound`'s value (kept for the callers that only need the number)."""
    return frr_bound(values, false_reject_rate).value


def quantile_thresholds(scores: Sequence[float], map_maxima: Sequence[float], false_reject_rate: float,
                        confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """(image threshold, pixel threshold) for known-good image scores and map maxima (see `frr_bound`)."""
    image, pixel = calibrated_bounds(scores, map_maxima, false_reject_rate, confidence)
    return image.value, pixel.value


def calibrated_bounds(scores: Sequence[float], map_maxima: Sequence[float], false_reject_rate: float,
                      confidence: float = DEFAULT_CONFIDENCE, *, what: str = "") -> tuple[Bound, Bound]:
    """Both bounds, just above the known-good value they sit on (a good frame scoring exactly the threshold is not
    alerted), with a WARNING naming `what` when the frames are too few for a distribution-free bound."""
    image = frr_bound(scores, false_reject_rate, confidence)
    pixel = frr_bound(map_maxima, false_reject_rate, confidence)
    if image.extrapolated:
        log.warning("%s%d known-good frames cannot bound a %.2f%% false-reject rate (that needs %d); the threshold "
                    "is extrapolated from their tail: add references or label normal frames",
                    f"{what}: " if what else "", image.n, 100 * false_reject_rate, image.needed)

    def nudged(bound: Bound) -> Bound:
        return Bound(min(1.0, bound.value + 1e-6), bound.rule, bound.n, bound.needed, bound.extrapolated)

    return nudged(image), nudged(pixel)


def store_thresholds(sessions: Any, *, source: str, model_version: str, threshold: float, pixel_threshold: float,
                     false_reject_rate: float, n_frames: int, method: str) -> None:
    """Insert or replace the (source, model version) calibration row."""
    from sqlalchemy import select

    from adapters.db import SourceThreshold, utcnow

    with sessions() as session, session.begin():
        row = session.scalars(select(SourceThreshold).where(SourceThreshold.source == source,
                                                            SourceThreshold.model_version == model_version)
                              ).one_or_none()
        if row is None:
            row = SourceThreshold(source=source, model_version=model_version)
            session.add(row)
        row.threshold, row.pixel_threshold = float(threshold), float(pixel_threshold)
        row.false_reject_rate, row.n_frames, row.method = float(false_reject_rate), int(n_frames), method[:64]
        row.created_at = utcnow()


def load_thresholds(sessions: Any) -> dict[tuple[str, str], tuple[float, float]]:
    from sqlalchemy import select

    from adapters.db import SourceThreshold

    with sessions() as session:
        return {(row.source, row.model_version): (row.threshold, row.pixel_threshold)
                for row in session.scalars(select(SourceThreshold))}


def stored_threshold(sessions: Any, source: str, model_version: str) -> Any | None:
    """The (source, model version) calibration row, or None."""
    from sqlalchemy import select

    from adapters.db import SourceThreshold

    with sessions() as session:
        return session.scalars(select(SourceThreshold).where(SourceThreshold.source == source,
                                                             SourceThreshold.model_version == model_version)
                               ).one_or_none()
