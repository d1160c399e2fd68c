"""The k-shot protocol of `anomalyd eval --shots`: fixed reference pools, references drawn by seed, pool images
held out of the test set, training normals used when the dataset has them, too-small categories skipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.datasets import Sample
from model.kshot import kshot_split


def samples(category: str, normals: int, anomalies: int, split: str = "test") -> list[Sample]:
    good = [Sample(Path(f"{category}/{split}/good/{i:03d}.png"), category, "good", 0, None, True)
            for i in range(normals)]
    bad = [Sample(Path(f"{category}/{split}/bad/{i:03d}.png"), category, "bad", 1, None, False)
           for i in range(anomalies)]
    return good + bad


def test_pool_is_held_out_and_references_come_from_it() -> None:
    test = samples("cubes", 100, 40) + samples("nut", 8, 8)
    split = kshot_split(test, 4, seed=0)
    # cubes: a pool of 16 normals leaves the test set; nut: half of its 8 normals
    assert len(split.tests["cubes"]) == 140 - 16 and len(split.tests["nut"]) == 16 - 4
    for category in ("cubes", "nut"):
        references = {s.path for s in split.references[category]}
        assert len(references) == 4
        assert not references & {s.path for s in split.tests[category]}
    # the test set is the same for every K and seed; the references change with the seed
    other = kshot_split(test, 1, seed=5)
    assert [s.path for s in other.tests["cubes"]] == [s.path for s in split.tests["cubes"]]
    draws = {tuple(sorted(str(s.path) for s in kshot_split(test, 4, seed=seed).references["cubes"]))
             for seed in range(5)}
    assert len(draws) > 1
    assert kshot_split(test, 4, seed=0).references == split.references


def test_training_normals_form_the_pool_when_present() -> None:
    test = samples("hazelnut", 7, 19)
    train = samples("hazelnut", 28, 0, split="train")
    split = kshot_split(test, 16, seed=0, train_samples=train)
    assert len(split.tests["hazelnut"]) == 26  # the whole test split stays
    assert all("/train/" in str(s.path) for s in split.references["hazelnut"])


def test_small_categories_are_skipped_with_the_reason() -> None:
    split = kshot_split(samples("bottle", 9, 8) + samples("pcb", 0, 3), 16, seed=0)
    assert "reference pool of 4, fewer than 16 shots" in split.skipped["bottle"]
    assert "pcb" in split.skipped and not split.tests
    with pytest.raises(ValueError, match="at least 1"):
        kshot_split(samples("bottle", 9, 8), 0)
