"""PatchCore's exact nearest-neighbour search (model/patchcore/search.py): both paths (bf16 candidates with the
fp32 re-check and certificate, plain fp32) against float64 brute force and the plain chunked search, on random and
real Lite0 features, with duplicated rows, ties, in-place bank changes; and the detector using it by default."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.patchcore import build_patchcore, nearest_neighbor, search
from tests.conftest import require

TOLERANCE = 1e-4  # of the raw distance


def truth(queries: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    distances = torch.cdist(queries.double(), bank.double())
    best, where = distances.min(dim=1)
    return best, where


def assert_exact(queries: torch.Tensor, bank: torch.Tensor, distance: torch.Tensor, index: torch.Tensor) -> None:
    best, where = truth(queries, bank)
    assert (distance.double() - best).abs().max() <= TOLERANCE * best.clamp_min(1.0).max()
    # the returned row is at the nearest distance (an exact tie may name another row at that distance)
    at_index = (queries.double() - bank.double()[index]).norm(dim=1)
    assert (at_index - best).abs().max() <= TOLERANCE * best.clamp_min(1.0).max()
    # where the runner-up is clearly farther, the index is the brute-force one
    second = torch.cdist(queries.double(), bank.double()).topk(2, dim=1, largest=False).values[:, 1]
    clear = second - best > 1e-3 * best.clamp_min(1.0)
    assert torch.equal(index[clear], where[clear])


@pytest.mark.parametrize("bf16", [True, False])
def test_random_features_match_brute_force_and_the_plain_search(bf16: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(4096, 152, generator=generator) * 3 + 1
    queries = torch.randn(700, 152, generator=generator) * 3 + 1
    distance, index = search.nearest(queries, bank, bf16=bf16)
    assert (search.prepare(bank).approx_t is not None) == bf16
    assert_exact(queries, bank, distance, index)
    plain, plain_index = nearest_neighbor(queries, bank)
    assert ((distance - plain).abs() / plain).max() <= TOLERANCE
    assert torch.equal(index, plain_index)


def test_duplicated_rows_and_ties() -> None:
    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(1024, 64, generator=generator)
    bank = torch.cat([rows, rows, rows, rows[:512]])  # every row 3-4 times: the certificate cannot separate them
    queries = torch.cat([rows[:100],  # exact copies of bank rows: distance 0
                         rows[:50] + 0.05 * torch.randn(50, 64, generator=generator),
                         (rows[:20] + rows[20:40]) / 2])  # equidistant from two rows
    distance, index = search.nearest(queries, bank, bf16=True)
    assert_exact(queries, bank, distance, index)
    assert distance[:100].abs().max() <= 1e-5
    assert torch.equal(bank[index[:100]], rows[:100])
    assert torch.equal(index[:100], torch.arange(100))  # the lowest index of the copies
    # equal distances to the two rows: the returned one is one of them
    chosen = index[150:]
    assert bool(((chosen % 1024 == torch.arange(20)) | (chosen % 1024 == torch.arange(20, 40))).all())


def test_unproven_queries_are_searched_again() -> None:
    """Near-duplicates closer than bf16 can tell apart: nothing is proven, the fp32 search answers them."""
    generator = torch.Generator().manual_seed(2)
    base = torch.randn(256, 32, generator=generator)
    # 16 copies 0.1 apart in distance: far above fp32's rounding, below what bf16 can order
    bank = torch.cat([base + 0.02 * torch.randn(256, 32, generator=generator) for _ in range(16)])
    queries = base[:64] + 0.02 * torch.randn(64, 32, generator=generator)
    distance, index = search.nearest(queries, bank, bf16=True)
    assert search.unproven_share(queries, bank) > 0.5
    assert_exact(queries, bank, distance, index)


def test_bank_changed_in_place_is_prepared_again() -> None:
    generator = torch.Generator().manual_seed(3)
    bank = torch.randn(4096, 48, generator=generator)
    queries = torch.randn(200, 48, generator=generator)
    search.nearest(queries, bank, bf16=True)
    bank[:2048] += 5.0
    distance, index = search.nearest(queries, bank, bf16=True)
    assert_exact(queries, bank, distance, index)


@pytest.mark.shared
def test_real_features_match_brute_force(shared_dir: Path) -> None:
    from safetensors.torch import load_file

    path = shared_dir / "golden" / "patchcore" / "expected.safetensors"
    require(path.is_file(), f"{path} is absent")
    expected = load_file(str(path))
    bank = expected["memory_bank"]  # 4 references x 1024 patches of real Lite0 features
    embedding = expected["test_embedding"]
    queries = embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])
    for bf16 in (True, False):
        distance, index = search.nearest(queries, bank.clone(), bf16=bf16)
        assert_exact(queries, bank, distance, index)
    assert search.unproven_share(queries, bank) < 0.05  # the certificate proves almost every real patch


def test_detector_searches_with_the_fast_path_by_default() -> None:
    detector = build_patchcore(device="cpu", max_bank_rows=0)
    generator = torch.Generator().manual_seed(4)
    detector.set_references(torch.randn(4, 3, 256, 256, generator=generator))  # 4096 rows
    images = torch.randn(1, 3, 256, 256, generator=generator)
    prediction = detector.predict(images)
    prepared = search.prepare(detector.model.memory_bank)
    assert (prepared.approx_t is not None) == search.cpu_has_fast_bf16()
    # the same scores as the plain chunked search
    model = detector.model
    from model.patchcore import clip_to_tf

    embedding = model.embed(clip_to_tf(images))
    plain, _ = nearest_neighbor(model.flatten(embedding), model.memory_bank)
    scores, _, _ = model.patch_scores(embedding)
    assert ((scores.flatten() - plain).abs() / plain).max() <= TOLERANCE
    assert prediction.scores.shape == (1,)


def test_prepared_banks_go_with_their_bank() -> None:
    """Calibration swaps banks many times: the prepared copies must not keep old banks (and their copies) alive."""
    import gc

    generator = torch.Generator().manual_seed(5)
    queries = torch.randn(10, 32, generator=generator)
    gc.collect()  # banks of earlier tests that wait in reference cycles go now, not during the count below
    before = len(search._prepared)
    for _ in range(3):
        with torch.inference_mode():  # as the daemon's calibration builds them
            bank = torch.randn(4096, 32, generator=generator)
            search.nearest(queries, bank, bf16=True)
    del bank
    gc.collect()
    assert len(search._prepared) == before

