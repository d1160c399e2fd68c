"""The promotion decision of a retraining run: is the candidate good enough, and what becomes of it.

The candidate is compared with the active model on the held-out labelled frames by `[retraining].rule` on
`metric` (not_worse: candidate >= active - tolerance; better: candidate > active + tolerance; always). It is
registered as a version either way (candidate when it passes, retired when not); with `promotion = "auto"` a
passing candidate is activated at once and the daemon hot-swaps to it.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from daemon.learning import versions as registry

if TYPE_CHECKING:
    from daemon.config.settings import Settings
    from daemon.learning.retraining import RetrainOutcome

log = logging.getLogger("anomalyd.retraining")

RULES = ("not_worse", "better", "always")


def jsonable(value: Any) -> Any:
    """`adapters.report.jsonable`, imported on use: that module loads torch, and config validation imports
    retraining (the operator commands must not pay for torch)."""
    from adapters.report import jsonable as convert

    return convert(value)


def promotion_decision(candidate: dict[str, Any] | None, active: dict[str, Any] | None, *, rule: str, metric: str,
                       tolerance: float) -> tuple[bool, str]:
    """(passes, reason) of the candidate against the active model's held-out metrics."""
    if rule not in RULES:
        raise ValueError(f"promotion rule {rule!r} is not one of {', '.join(RULES)}")
    if rule == "always":
        return True, "rule 'always'"
    cand = _number((candidate or {}).get(metric))
    if cand is None:
        return False, f"the candidate's {metric} is undefined on the held-out frames"
    act = _number((active or {}).get(metric))
    if act is None:
        return False, f"the active model's {metric} could not be measured; only rule 'always' promotes"
    if rule == "not_worse":
        passes = cand >= act - tolerance
        return passes, f"{metric} {cand:.4f} vs active {act:.4f} (not_worse, tolerance {tolerance:g})"
    passes = cand > act + tolerance
    return passes, f"{metric} {cand:.4f} vs active {act:.4f} (better, tolerance {tolerance:g})"


def operating_point_decision(point: dict[str, Any], reason: str) -> tuple[bool, str]:
    """The second half of the gate when the job measured both models at their calibrated thresholds (a head's
    run): the candidate must not miss more held-out defects, nor alert more held-out normals, than the active."""
    cand, act = point.get("candidate") or {}, point.get("active") or {}
    text = (f"{reason}; at the calibrated thresholds it misses {cand.get('missed')} of {cand.get('defects')} "
            f"held-out defects (active {act.get('missed')}) and alerts {cand.get('false_alarms')} of "
            f"{cand.get('normals')} held-out normals (active {act.get('false_alarms')})")
    worse = (int(cand.get("missed", 0)) > int(act.get("missed", 0))
             or int(cand.get("false_alarms", 0)) > int(act.get("false_alarms", 0)))
    return not worse, text


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


class Promotion:
    """Registers a finished run's candidate and promotes it when the rule (and `promotion = "auto"`) say so."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], *,
                 on_activated: Callable[[], Any] | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        self.on_activated = on_activated
        self.config = settings.retraining

    def decide(self, spec: dict[str, Any], result: dict[str, Any], outcome: RetrainOutcome,
               note: Callable[[str], None]) -> None:
        """`spec`: the job the training process ran; `result`: its result.json. Fills `outcome`."""
        cfg = self.config
        candidate, active = result.get("candidate"), result.get("active")
        if result.get("active_error"):
            note(f"the active model could not be evaluated: {result['active_error']}")
        passes, reason = promotion_decision(candidate, active, rule=cfg.rule, metric=cfg.metric,
                                            tolerance=cfg.tolerance)
        if passes and cfg.rule != "always" and result.get("operating_point"):
            passes, reason = operating_point_decision(result["operating_point"], reason)
        version = spec["version"]
        target = registry.version_file(self.settings, version)
        shutil.move(spec["output"], target)
        metrics = {"holdout": candidate, "active_holdout": active,
                   "active_version": (spec.get("active") or {}).get("version"), "rule": cfg.rule,
                   "metric": cfg.metric, "tolerance": cfg.tolerance, "passes": passes, "reason": reason,
                   "run_id": spec["run_id"], "data": outcome.metrics.get("data"),
                   "synthetic_holdout": result.get("synthetic_holdout"), "history": result.get("history"),
                   "operating_point": result.get("operating_point")}
        promote = passes and cfg.promotion == "auto"
        status = "candidate" if passes else "retired"
        with self.sessions() as session, session.begin():
            registry.register_version(session, version=version, kind=spec["model"]["kind"], prompts_path=target,
                                      metrics=jsonable(metrics), status=status,
                                      notes=f"run #{spec['run_id']}: {'passes' if passes else 'rejected'}: {reason}")
        outcome.candidate_version, outcome.passes, outcome.reason = version, passes, reason
        outcome.metrics.update(metrics)
        outcome.status = "succeeded"
        if promote:
            registry.activate_version(self.sessions, version)
            outcome.promoted = True
            note(f"{version} promoted: {reason}")
            if self.on_activated is not None:
                try:
                    self.on_activated()
                except Exception:
                    log.exception("hot swap after the promotion of %s failed (the watcher retries)", version)
        elif passes:
            note(f"{version} passes ({reason}); promotion is manual: activate it with "
                 f"`anomalyd models activate {version}`")
        else:
            note(f"{version} rejected: {reason}")
