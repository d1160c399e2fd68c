"""PatchCore's exact nearest-neighbour search (model/patchcore/search.py): every path (int8 and bf16 candidates with
the fp32 re-check and certificate, plain fp32) against float64 brute force, fp32 `torch.cdist` and the plain chunked
search, on random and real Lite0 features, with duplicated rows, ties, queries equal to bank rows, tiny banks, empty
queries, in-place bank changes, the split across single-threaded workers; and the detector using it by default."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.patchcore import build_patchcore, nearest_neighbor, search, search_int8
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
    if bank.shape[0] == 1:
        assert bool((index == 0).all())
        return
    second = torch.cdist(queries.double(), bank.double()).topk(2, dim=1, largest=False).values[:, 1]
    clear = second - best > 1e-3 * best.clamp_min(1.0)
    assert torch.equal(index[clear], where[clear])


MODES = ["int8", "bf16", "fp32"]


def available(mode: str) -> None:
    if mode == "int8" and not search_int8.int8_product_works():
        pytest.skip("torch._int_mm does not run here")


@pytest.mark.parametrize("mode", MODES)
def test_random_features_match_brute_force_and_the_plain_search(mode: str) -> None:
    available(mode)
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(4096, 152, generator=generator) * 3 + 1
    queries = torch.randn(700, 152, generator=generator) * 3 + 1
    distance, index = search.nearest(queries, bank, candidates=mode)
    prepared = search.prepare(bank)
    assert (prepared.approx_t is not None, prepared.int8 is not None) == (mode == "bf16", mode == "int8")
    assert_exact(queries, bank, distance, index)
    plain, plain_index = nearest_neighbor(queries, bank)
    assert ((distance - plain).abs() / plain).max() <= TOLERANCE
    assert torch.equal(index, plain_index)


@pytest.mark.parametrize("mode", ["int8", "bf16"])
def test_duplicated_rows_and_ties(mode: str) -> None:
    available(mode)
    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(1024, 64, generator=generator)
    bank = torch.cat([rows, rows, rows, rows[:512]])  # every row 3-4 times: the certificate cannot separate them
    queries = torch.cat([rows[:100],  # exact copies of bank rows: distance 0
                         rows[:50] + 0.05 * torch.randn(50, 64, generator=generator),
                         (rows[:20] + rows[20:40]) / 2])  # equidistant from two rows
    distance, index = search.nearest(queries, bank, candidates=mode)
    assert_exact(queries, bank, distance, index)
    assert distance[:100].abs().max() <= 1e-5
    assert torch.equal(bank[index[:100]], rows[:100])
    assert torch.equal(index[:100], torch.arange(100))  # the lowest index of the copies
    # equal distances to the two rows: the returned one is one of them
    chosen = index[150:]
    assert bool(((chosen % 1024 == torch.arange(20)) | (chosen % 1024 == torch.arange(20, 40))).all())


@pytest.mark.parametrize("mode", ["int8", "bf16"])
def test_unproven_queries_are_searched_again(mode: str) -> None:
    """Near-duplicates closer than bf16 / int8 can tell apart: nothing is proven, the fp32 search answers them."""
    available(mode)
    generator = torch.Generator().manual_seed(2)
    # copies 0.1 apart in distance: far above fp32's rounding, below what bf16 / int8 can order; int8 re-checks up
    # to RECHECK_WIDE rows, so it gets more copies than that
    copies, n_base = (16, 256) if mode == "bf16" else (search_int8.RECHECK_WIDE + 8, 64)
    base = torch.randn(n_base, 32, generator=generator)
    bank = torch.cat([base + 0.02 * torch.randn(n_base, 32, generator=generator) for _ in range(copies)])
    queries = base[:64] + 0.02 * torch.randn(64, 32, generator=generator)
    distance, index = search.nearest(queries, bank, candidates=mode)
    assert search.unproven_share(queries, bank) > 0.5
    assert_exact(queries, bank, distance, index)


@pytest.mark.parametrize("mode", ["int8", "bf16"])
def test_bank_changed_in_place_is_prepared_again(mode: str) -> None:
    available(mode)
    generator = torch.Generator().manual_seed(3)
    bank = torch.randn(4096, 48, generator=generator)
    queries = torch.randn(200, 48, generator=generator)
    search.nearest(queries, bank, candidates=mode)
    bank[:2048] += 5.0
    distance, index = search.nearest(queries, bank, candidates=mode)
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
    for mode in MODES:
        distance, index = search.nearest(queries, bank.clone(), candidates=mode)
        assert_exact(queries, bank, distance, index)
    assert search.unproven_share(queries, bank) < 0.05  # the certificate proves almost every real patch


def test_detector_searches_with_the_fast_path_by_default() -> None:
    detector = build_patchcore(device="cpu", max_bank_rows=0)
    generator = torch.Generator().manual_seed(4)
    detector.set_references(torch.randn(4, 3, 256, 256, generator=generator))  # 4096 rows
    images = torch.randn(1, 3, 256, 256, generator=generator)
    prediction = detector.predict(images)
    prepared = search.prepare(detector.model.memory_bank)
    assert prepared.mode == search.default_candidates(torch.device("cpu"))
    assert prepared.mode != "int8" or prepared.int8 is not None
    assert prepared.mode != "bf16" or prepared.approx_t is not None
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
            search.nearest(queries, bank.clone(), candidates="int8")
    del bank
    gc.collect()
    assert len(search._prepared) == before



@pytest.fixture(scope="module")
def lite0_hazelnut(samples_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(bank, queries): a full 16-reference bank of real Lite0 features (16384 rows) and 2 test images' patches."""
    from model.fewshot import load_reference_images
    from model.patchcore import clip_to_tf

    category = samples_dir / "hazelnut"
    references = sorted((category / "train" / "good").glob("*"))[:16]
    tests = sorted((category / "test").glob("*/*"))
    require(len(references) == 16 and len(tests) >= 2, f"{category} lacks 16 references and 2 test images")
    detector = build_patchcore(device="cpu", max_bank_rows=0)
    detector.set_references(load_reference_images(references, 256))
    model = detector.model
    with torch.no_grad():
        queries = model.flatten(model.embed(clip_to_tf(load_reference_images([tests[0], tests[-1]], 256))))
    return model.memory_bank.detach().clone(), queries


@pytest.mark.shared
@pytest.mark.parametrize("mode", MODES)
def test_real_lite0_features_match_fp32_cdist(lite0_hazelnut: tuple[torch.Tensor, torch.Tensor], mode: str) -> None:
    """Full bank of real Lite0 features: the same rows and distances as a brute-force fp32 `torch.cdist`."""
    available(mode)
    bank, queries = lite0_hazelnut
    assert bank.shape == (16384, 152)
    distance, index = search.nearest(queries, bank.clone(), candidates=mode)
    # fp32 brute force, as differences (cdist's default |q|² + |x|² - 2q·x is off by 0.02 at distance 0)
    reference = torch.cdist(queries, bank, compute_mode="donot_use_mm_for_euclid_dist")
    best, where = reference.min(dim=1)
    assert (distance - best).abs().max() <= TOLERANCE
    # the same row wherever fp32 tells the nearest from the runner-up (ties aside)
    second = reference.topk(2, dim=1, largest=False).values[:, 1]
    clear = second - best > 1e-4
    assert clear.float().mean() > 0.95
    assert torch.equal(index[clear], where[clear])
    assert_exact(queries, bank, distance, index)


@pytest.mark.shared
def test_real_lite0_adversarial_cases(lite0_hazelnut: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Duplicated bank rows, queries equal to bank rows, tiny banks and empty queries, on real Lite0 features."""
    bank, queries = lite0_hazelnut
    modes = [mode for mode in MODES if mode != "int8" or search_int8.int8_product_works()]
    duplicated = torch.cat([bank[:4096], bank[:4096]])  # every row twice: copies are never separated
    copies = torch.cat([bank[:300], bank[5000:5300] + 1e-3, queries[:424]])  # equal to rows, next to rows, real
    for mode in modes:
        distance, index = search.nearest(copies, duplicated.clone(), candidates=mode)
        assert_exact(copies, duplicated, distance, index)
        assert distance[:300].abs().max() <= 1e-5
        assert torch.equal(index[:300], torch.arange(300))  # the lowest index of the two copies
        distance, index = search.nearest(queries[:300], bank.clone(), candidates=mode)
        assert_exact(queries[:300], bank, distance, index)
        for rows in (1, 7, 300):  # tiny banks: the plain fp32 search, same answer
            tiny = bank[:rows].clone()
            distance, index = search.nearest(queries[:50], tiny, candidates=mode)
            assert_exact(queries[:50], tiny, distance, index)
        empty_distance, empty_index = search.nearest(queries[:0], bank.clone(), candidates=mode)
        assert empty_distance.shape == (0,) and empty_index.shape == (0,)
        one_distance, one_index = search.nearest(queries[:1], bank.clone(), candidates=mode)
        assert_exact(queries[:1], bank, one_distance, one_index)


@pytest.mark.skipif(not search_int8.int8_product_works(), reason="torch._int_mm does not run here")
def test_split_across_workers_gives_the_same_answer() -> None:
    """The int8 search split across single-threaded workers answers as one call on the intra-op threads, and
    leaves the caller's thread count alone."""
    from model.patchcore import workers

    generator = torch.Generator().manual_seed(6)
    bank = torch.randn(4096, 64, generator=generator)
    queries = torch.randn(1500, 64, generator=generator)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        prepared = search.prepare(bank, candidates="int8")
        split = workers.split_rows(search_int8.int8_search, queries, bank, prepared.int8)
        whole = search_int8.int8_search(queries, bank, prepared.int8)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(split, whole, strict=True):
        assert torch.equal(a, b)
    assert_exact(queries, bank, *search.nearest(queries, bank))
    with torch.inference_mode():  # as the daemon calls it: inference tensors handed to the workers
        frozen_bank, frozen_queries = bank.clone(), queries.clone()
        torch.set_num_threads(2)
        try:
            distance, index = search.nearest(frozen_queries, frozen_bank, candidates="int8")
        finally:
            torch.set_num_threads(threads)
    assert search.prepare(frozen_bank).int8 is not None
    assert_exact(queries, bank, distance, index)


@pytest.mark.skipif(not search_int8.int8_product_works(), reason="torch._int_mm does not run here")
def test_int8_is_not_used_where_it_cannot_fit() -> None:
    """A bank with a non-finite value is searched in fp32; one whose norms span 5 decades stays exact."""
    generator = torch.Generator().manual_seed(7)
    queries = torch.randn(300, 32, generator=generator)
    broken = torch.randn(4096, 32, generator=generator)
    broken[5, 3] = float("nan")
    assert search.prepare(broken, candidates="int8").int8 is None
    distance, index = search.nearest(queries, broken, candidates="int8")
    plain, plain_index = nearest_neighbor(queries, broken)
    assert torch.equal(index, plain_index)
    assert torch.allclose(distance, plain, rtol=TOLERANCE, equal_nan=True)
    spread = torch.randn(4096, 32, generator=generator) * torch.logspace(-3, 2, 4096).unsqueeze(1)
    assert_exact(queries, spread, *search.nearest(queries, spread, candidates="int8"))


@pytest.mark.parametrize("mode", ["int8", "bf16"])
def test_rows_closer_than_fp32_cancellation_are_still_ordered(mode: str) -> None:
    """Clusters of 64 rows 1e-3 wide, 40 from the origin: neither certificate nor fp32's |x|² - 2q·x can order them
    (its cancellation is ~1e-4 of d²); the fallback proves what it can and searches the rest in float64."""
    available(mode)
    generator = torch.Generator().manual_seed(8)
    centres = torch.randn(64, 64, generator=generator) * 5
    bank = centres.repeat_interleave(64, 0) + 1e-3 * torch.randn(4096, 64, generator=generator)
    pick = torch.randint(0, 4096, (300,), generator=generator)
    queries = bank[pick] + torch.randn(300, 64, generator=generator) * torch.logspace(-6, -3, 300).unsqueeze(1)
    distance, index = search.nearest(queries, bank, candidates=mode)
    best, where = truth(queries, bank)
    assert (distance.double() - best).abs().max() <= 1e-6
    assert torch.equal(index, where)
