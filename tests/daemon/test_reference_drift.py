"""The drift watch of a source on references (daemon/detectors/drift_watch.py through daemon/detectors/routing.py), without a model:
a detector whose maps are hot where the test says. A sustained change of most of the frame is one drift event from
the frame where it began; a defect flood (a hot region on every other frame) and single odd frames are not; the
notes reach the daemon's drift record as mutual scoring's do, and a PatchCore drift ends when the frames match the
references again or other references arrive. Real frames and weights: bench/drift_cases.py, test_e2e_drift.py."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
import torch

from daemon.detectors.routing import RoutedDetector
from daemon.zero_label.drift import DriftTracker
from model.detector import Prediction
from model.drift import DriftWatch

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=timezone.utc)
VERSION = "patchcore-efficientnet-lite0-t4-10-s256+ref-abc-k8"


class HotMaps:
    """Maps on the 0-1 scale: 0.1 everywhere, 0.9 on the first `image[0, 0, 0]` share of the rows."""

    name = "patchcore"
    version = VERSION
    image_size = 20
    distance_scale = 1.0

    def __init__(self, known_good: bool = True, floor: bool = False) -> None:
        # the normal level: median held-out map maximum, raw 0.5 → 1 - exp(-0.5) = 0.39 on the daemon's scale
        self.known_good = SimpleNamespace(maxima=[0.4, 0.5, 0.6]) if known_good else None
        if floor:  # a family with a threshold floor (patchcore-head): its maps go through its head
            self.name = "patchcore-head"

    def predict(self, images: torch.Tensor, class_names=None) -> Prediction:
        maps = torch.full((images.shape[0], 20, 20), 0.1)
        for index, image in enumerate(images):
            maps[index, :round(20 * float(image[0, 0, 0]))] = 0.9
        return Prediction(scores=maps.flatten(1).amax(1), maps=maps)


def frames(*hot: float) -> torch.Tensor:
    return torch.stack([torch.full((3, 20, 20), share) for share in hot])


def run(routed: RoutedDetector, hot: list[float], source: str = "cam") -> list[dict | None]:
    notes: list[dict | None] = []
    for share in hot:  # one frame per batch, as a free-running camera arrives
        prediction, _ = routed.predict_routed(frames(share), None, [source])
        notes += prediction.notes or [None]
    return notes


def test_a_sustained_whole_frame_change_is_one_event_a_defect_flood_and_odd_frames_are_not():
    detector = HotMaps()
    routed = RoutedDetector(HotMaps(known_good=False), {"cam": detector})
    normal, defect, changed = 0.0, 0.15, 0.6
    notes = run(routed, [normal] * 4 + [defect, normal] * 10 + [changed, normal, changed, changed, normal])
    assert all(n is not None and n["decided"] for n in notes)
    assert not any("drift_event" in n for n in notes), [n["unmatched_share"] for n in notes]
    assert [n["unmatched_share"] for n in notes[4:6]] == [0.15, 0.0]  # the defect's rows, nothing else
    first = len(notes)
    notes += run(routed, [changed] * 5)
    events = [(i, n) for i, n in enumerate(notes) if "drift_event" in n]
    assert len(events) == 1, events
    index, note = events[0]
    assert index == first + 2 and note["drift_event"]["frame"] == first and note["drifting"]
    assert note["drift_event"]["share"] == pytest.approx(0.6)
    assert all(n["drifting"] for n in notes[index:])
    assert "reference_drift_watch" in vars(detector)  # one watch per source detector, kept across swaps
    rebuilt = RoutedDetector(HotMaps(known_good=False), {"cam": detector})
    # one matching frame does not end it (hysteresis), three in a row do
    ends = run(rebuilt, [normal, changed, normal, normal, normal])
    assert [n["drifting"] for n in ends] == [True, True, True, True, False]
    assert [n.get("drift_cleared", False) for n in ends] == [False, False, False, False, True]
    assert not any("drift_event" in n for n in ends)  # still the one drift


def test_a_stream_alternating_products_is_one_drift_not_one_every_few_frames():
    routed = RoutedDetector(HotMaps(known_good=False), {"cam": HotMaps()})
    other, own = 0.8, 0.0
    notes = run(routed, [own] * 4 + [other, other, other, own] * 12)
    events = [n for n in notes if "drift_event" in n]
    cleared = [n for n in notes if n.get("drift_cleared")]
    assert len(events) == 1 and cleared == [], (len(events), len(cleared))
    assert all(n["drifting"] for n in notes[notes.index(events[0]):])


def test_only_a_source_detector_with_held_out_known_good_maps_is_watched():
    base = HotMaps()
    routed = RoutedDetector(base, {"head": HotMaps(floor=True), "bare": HotMaps(known_good=False)})
    for source in ("other", "head", "bare"):  # the shared base; patchcore-head; no held-out references
        assert run(routed, [0.6] * 4, source) == [None] * 4, source


def test_a_reference_drift_ends_when_the_frames_match_again_or_other_references_arrive(sqlite_sessions):
    tracker = DriftTracker(sqlite_sessions)
    routed = RoutedDetector(HotMaps(known_good=False), {"cam": HotMaps()})
    clock = iter(T0 + timedelta(seconds=i) for i in range(100))
    held = [tracker.observe("cam", "l1", VERSION, note, next(clock)) for note in run(routed, [0.0, 0.8, 0.8, 0.8])]
    # the drift opens on the 4th frame, and a source on references holds none of its alerts back
    assert held == [False, False, False, False] and "cam" in tracker.active
    assert tracker.active["cam"].started_at == T0 + timedelta(seconds=1)
    for note in run(routed, [0.0, 0.0]):
        tracker.observe("cam", "l1", VERSION, note, next(clock))
    assert "cam" in tracker.active  # two matching frames are not yet the end
    tracker.observe("cam", "l1", VERSION, run(routed, [0.0])[0], next(clock))
    assert "cam" not in tracker.active
    assert tracker._pending.cleared[-1][1] == "the frames match the references again"
    run_notes = run(routed, [0.8, 0.8, 0.8])
    for note in run_notes:
        tracker.observe("cam", "l1", VERSION, note, next(clock))
    assert "cam" in tracker.active
    assert tracker.observe("cam", "l1", VERSION.replace("-k8", "-k11"), None, next(clock)) is False
    assert "cam" not in tracker.active and "new references" in tracker._pending.cleared[-1][1]


def test_the_cusum_caps_a_frame_and_a_normal_looking_frame_ends_an_excursion():
    watch = DriftWatch(expected=0.0, allowance=0.1, limit=1.0, cap=0.5)
    watch.level = 0.5
    whole = torch.ones(100)  # every patch above the level: adds 0.5 - 0.1, not 0.9
    assert watch.update(whole) is None and watch.sum == 0.4
    assert watch.update(whole) is None and watch.update(torch.zeros(100)) is None and watch.sum == 0.0
    assert watch.start is None  # the normal-looking frame ended the excursion
    assert [watch.update(whole) for _ in range(2)] == [None, None]
    event = watch.update(whole)
    assert event is not None and (event.frame, event.detected_at, event.share) == (3, 5, 1.0)
