"""Exact nearest-neighbour search of PatchCore's memory bank: `nearest(queries, bank, bank_norms)`.

The result is the exact Euclidean nearest bank row of each query (the fp32 distance, the lowest index among exact
ties), whichever path runs:

- CPU with int8 products (AVX512-VNNI, AVX-VNNI, AMX): an exact int8 product of rotated, rounded rows finds
  candidates, fp32 re-checks them, and a per-query certificate (triangle inequality on the rounding errors) proves
  that no other row can be nearer; see model/patchcore/search_int8.py. The default where available.
- CPU with native bf16 (AVX512-BF16 or AMX) and no int8 product: a bf16 matrix product finds candidates, fp32
  re-checks them, and a per-query certificate proves that no other row can be nearer. See `_bf16_search`.
- On both candidate paths the queries the certificate cannot prove (near-ties within the rounding, duplicated bank
  rows) are searched again in fp32 with a certificate of its own, and where even that cannot order the rows, in
  float64 (`_certified_fallback`).
- everywhere else (CUDA, CPUs without bf16, small banks): one fp32 product per block with the bank stored
  transposed (MKL multiplies it up to twice as fast as `bank.t()` on 2 threads), its squared norms precomputed.

The prepared forms of a bank (int8 or centred bf16 copy, transposed fp32 copy) are cached per bank tensor, so swapping
`model.memory_bank` (as calibration does) needs no call here; an in-place change of the bank is noticed too.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from model.patchcore.search_int8 import Int8Bank, cpu_has_vnni, int8_product_works, int8_search, prepare_int8
from model.patchcore.workers import split_rows

# Bank rows per group (the candidates are the best rows of the best groups) and how many of each.
ROW_GROUP = 16
CANDIDATE_GROUPS = 4
CANDIDATE_ROWS = 8
# Queries per block: a block's (queries x bank) bf16 products take 32 MiB at 16384 rows.
QUERY_BLOCK = 1024
# Below this many bank rows the plain fp32 search is as fast (the bf16 and int8 paths have fixed costs).
MIN_BF16_ROWS = 2048
MIN_INT8_ROWS = 2048
CANDIDATE_MODES = ("int8", "bf16", "fp32")
# Distances per fp32 block in the plain search: 2^22 floats = 16 MiB.
EXACT_BLOCK_ELEMENTS = 1 << 22
_BF16_UNIT = 2.0 ** -8  # unit roundoff of bfloat16 (8 significant bits)
_FP32_UNIT = 2.0 ** -24
FALLBACK_ROWS = 32  # rows the fallback re-checks per unproven query
_PAD_NORM = 2.0 ** 100  # squared norm of the padding rows: never a candidate


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (else oneDNN emulates it, slower than fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_candidates(device: torch.device) -> str:
    """The fastest candidate path here: int8 on CPUs with VNNI, else bf16 on CPUs with native bf16, else fp32."""
    if device.type != "cpu":
        return "fp32"
    if cpu_has_vnni() and int8_product_works():
        return "int8"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


@dataclass
class PreparedBank:
    """A bank in the layouts the search multiplies fastest; built once per bank tensor."""

    norms: torch.Tensor  # (M,) fp32 squared norms
    rows_t: torch.Tensor  # (D, M) fp32, contiguous
    version: int
    mode: str = "fp32"  # candidates asked for: int8, bf16 or fp32 (int8 / approx_t stay None below their minimum)
    int8: Int8Bank | None = None
    mean: torch.Tensor | None = None  # (D,) the bank's mean: the bf16 copy is centred on it
    approx_t: torch.Tensor | None = None  # (D + 4, M padded to ROW_GROUP) bf16: [x̃; 1; 1; N_hi; N_lo]
    max_norm: float = 0.0  # max |x̃| of the centred bf16 rows
    max_rounding: float = 0.0  # max |x̃ - x| over the rows
    max_bank_norm: float = 0.0  # max N


# id(bank) → (weak reference to the bank, its prepared form); the entry goes when the bank does (the prepared
# form holds copies only, never the bank itself).
_prepared: dict[int, tuple[weakref.ref, PreparedBank]] = {}


def _hi_lo(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values ≈ hi + lo in bf16 (to 2^-16 relative)."""
    hi = values.to(torch.bfloat16)
    return hi, (values - hi.float()).to(torch.bfloat16)


def _version(bank: torch.Tensor) -> int:
    """The bank's in-place change counter (-1 for inference-mode tensors, which have none)."""
    try:
        return bank._version
    except RuntimeError:
        return -1


def _mode(bf16: bool | None, candidates: str | None) -> str | None:
    if candidates is not None:
        if candidates not in CANDIDATE_MODES:
            raise ValueError(f"candidates must be one of {CANDIDATE_MODES}, not {candidates!r}")
        return candidates
    return None if bf16 is None else ("bf16" if bf16 else "fp32")


def prepare(bank: torch.Tensor, bank_norms: torch.Tensor | None = None, *, bf16: bool | None = None,
            candidates: str | None = None) -> PreparedBank:
    """The cached `PreparedBank` of `bank` (M, D) (built on first use, rebuilt if the bank changed in place).
    `candidates` ("int8", "bf16", "fp32"; `bf16` True/False is "bf16"/"fp32") forces a path for a new bank."""
    mode = _mode(bf16, candidates)
    key, version = id(bank), _version(bank)
    cached = _prepared.get(key)
    if cached is not None and cached[0]() is bank and cached[1].version == version and mode in (None, cached[1].mode):
        return cached[1]
    rows = bank.float().contiguous()
    norms = rows.pow(2).sum(dim=1) if bank_norms is None else bank_norms.float()
    prepared = PreparedBank(norms=norms, rows_t=rows.t().contiguous(), version=version)
    prepared.mode = default_candidates(rows.device) if mode is None else mode
    if prepared.mode == "int8" and rows.shape[0] >= MIN_INT8_ROWS and rows.device.type == "cpu" \
            and bool(torch.isfinite(rows).all()):  # a non-finite bank is searched in fp32 (no int8 scale fits it)
        prepared.int8 = prepare_int8(rows)  # None where the norms would need too many digit columns
    if prepared.mode == "bf16" and rows.shape[0] >= MIN_BF16_ROWS:
        mean = rows.double().mean(dim=0).float()
        centred = rows - mean
        rounded = centred.to(torch.bfloat16)
        residual = rounded.float() - centred
        # first-order rounding correction folded into the norm column (see _bf16_search)
        corrected = centred.pow(2).sum(dim=1) + 2.0 * (residual * centred).sum(dim=1)
        hi, lo = _hi_lo(corrected)
        n_rows, padded = rows.shape[0], -(-rows.shape[0] // ROW_GROUP) * ROW_GROUP
        approx = torch.zeros(padded, rows.shape[1] + 4, dtype=torch.bfloat16, device=rows.device)
        approx[:n_rows, :-4] = rounded
        approx[:, -4:-2] = 1.0
        approx[:n_rows, -2], approx[:n_rows, -1] = hi, lo
        approx[n_rows:, -2] = _PAD_NORM
        prepared.mean, prepared.approx_t = mean, approx.t().contiguous()
        prepared.max_norm = float(rounded.float().norm(dim=1).max())
        prepared.max_rounding = float(residual.norm(dim=1).max())
        prepared.max_bank_norm = float(corrected.abs().max())
    if cached is None or cached[0]() is not bank:
        weakref.finalize(bank, _prepared.pop, key, None)
    _prepared[key] = (weakref.ref(bank), prepared)
    return prepared


def exact_nearest(queries: torch.Tensor, rows: torch.Tensor, prepared: PreparedBank,
                  max_elements: int = EXACT_BLOCK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance, index) by fp32 products against the transposed bank, in blocks of queries and bank columns."""
    n_queries, n_bank = queries.shape[0], rows.shape[0]
    query_block = max(1, min(n_queries, max_elements // max(1, min(n_bank, max_elements))))
    bank_block = max(1, max_elements // query_block)
    best = torch.empty(n_queries, device=queries.device, dtype=torch.float32)
    where = torch.empty(n_queries, device=queries.device, dtype=torch.long)
    for q_start in range(0, n_queries, query_block):
        query = queries[q_start:q_start + query_block]
        block_best = block_where = None
        for b_start in range(0, n_bank, bank_block):
            # |x|² - 2 q·x (+|q|² after the minimum: it does not change the order)
            partial = torch.addmm(prepared.norms[b_start:b_start + bank_block], query,
                                  prepared.rows_t[:, b_start:b_start + bank_block], alpha=-2.0)
            value, index = partial.min(dim=1)
            if block_best is None:
                block_best, block_where = value, index
            else:
                better = value < block_best
                block_best = torch.where(better, value, block_best)
                block_where = torch.where(better, index + b_start, block_where)
        where[q_start:q_start + query_block] = block_where
        # the distance itself as a difference: |q|² - 2q·x + |x|² loses ~1e-7 |q|² to cancellation
        best[q_start:q_start + query_block] = (query - rows[block_where]).pow_(2).sum(dim=1).sqrt_()
    return best, where


def _bf16_search(queries: torch.Tensor, rows: torch.Tensor, prepared: PreparedBank,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(distance, index, proven) of each query; `proven[i]` False: query i must be searched again exactly.

    With q̃, x̃ the bf16 roundings of the centred q, x and δq = q̃ - q, δx = x̃ - x, the product of
    [-2q̃, M_hi, M_lo, 1, 1] and [x̃, 1, 1, N_hi, N_lo], where M = |q|² + 2δq·q and N = |x|² + 2δx·x, is
    v = d² + 2(x - q)·(δx - δq) - 2δq·δx, accumulated in fp32 and rounded once to bf16 (relative 2^-8). The
    rows not re-checked all have rounded v ≥ T (the next value after the candidates in their selection). A row
    with d² ≤ e (e: the best re-checked distance²) would have v ≤ e + 2√e·a + b + c (a = |δq| + max|δx|,
    b = 2|δq|·max|δx|, c: fp32 accumulation and the hi/lo split), so a lower bound of T above that proves e.
    """
    approx_t = prepared.approx_t
    n_queries, n_rows, n_padded = queries.shape[0], rows.shape[0], approx_t.shape[1]
    # few operations on whole matrices: on a loaded machine each parallel one waits for its threads
    centred = queries - prepared.mean
    doubled = (centred * -2.0).to(torch.bfloat16)  # -2q̃ (scaling by 2 is exact)
    q_rounded_norm = torch.linalg.vector_norm(doubled, dim=1, dtype=torch.float32) * 0.5  # |q̃|
    q_rounding = torch.linalg.vector_norm(doubled.float().mul_(-0.5).sub_(centred), dim=1)  # |δq|
    corrected = q_rounded_norm.square() - q_rounding.square()  # |q̃|² - |δq|² = |q|² + 2δq·q
    hi, lo = _hi_lo(corrected)
    ones = torch.ones(n_queries, 2, dtype=torch.bfloat16, device=queries.device)
    augmented = torch.cat((doubled, hi.unsqueeze(1), lo.unsqueeze(1), ones), dim=1)
    n_groups = n_padded // ROW_GROUP
    offsets = torch.arange(ROW_GROUP, device=queries.device) * n_groups
    candidates = torch.empty(n_queries, CANDIDATE_ROWS, dtype=torch.long, device=queries.device)
    threshold = torch.empty(n_queries, dtype=torch.bfloat16, device=queries.device)
    for start in range(0, n_queries, QUERY_BLOCK):
        values = augmented[start:start + QUERY_BLOCK] @ approx_t  # (n, padded) ≈ d², bf16
        # group g holds the rows g, g + G, g + 2G, ...: the minimum runs over whole contiguous slices
        group_best = values.view(values.shape[0], ROW_GROUP, n_groups).amin(dim=1)
        group_values, groups = group_best.topk(CANDIDATE_GROUPS + 1, dim=1, largest=False)
        members = (groups[:, :CANDIDATE_GROUPS, None] + offsets).flatten(1)
        member_values, picked = values.gather(1, members).topk(CANDIDATE_ROWS + 1, dim=1, largest=False)
        candidates[start:start + QUERY_BLOCK] = members.gather(1, picked[:, :CANDIDATE_ROWS])
        threshold[start:start + QUERY_BLOCK] = torch.minimum(group_values[:, -1], member_values[:, -1])
    # fp32 re-check, as differences (no cancellation); padding rows are never candidates (norm 2^100)
    distances = torch.linalg.vector_norm(queries.unsqueeze(1) - rows[candidates.clamp_(max=n_rows - 1)], dim=2)
    nearest_distance = distances.amin(dim=1)
    where = torch.where(distances == nearest_distance.unsqueeze(1), candidates, n_padded).amin(dim=1)
    best = nearest_distance.square()
    # certificate
    lower = threshold.float()
    lower = lower - _BF16_UNIT * 1.01 * lower.abs()
    a = q_rounding + prepared.max_rounding
    b = 2.0 * q_rounding * prepared.max_rounding
    magnitude = 2.0 * q_rounded_norm * prepared.max_norm + corrected.abs() + prepared.max_bank_norm
    c = (approx_t.shape[0] * 2.0 * _FP32_UNIT + 2.0 ** -15) * magnitude + 1e-5 * best
    proven = lower > best + 2.0 * nearest_distance * a + b + c
    return nearest_distance, where, proven


def _certified_fallback(queries: torch.Tensor, rows: torch.Tensor, prepared: PreparedBank, max_elements: int,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The queries a candidate certificate could not prove (near-ties, duplicated rows): the FALLBACK_ROWS lowest
    fp32 values of |x|² - 2q·x re-checked as differences, proven by the fp32 dot-product error bound
    γ_D·(|x|² + 2|q||x|); the rest (rows closer than fp32's cancellation) by float64 brute force."""
    n_queries, n_rows = queries.shape[0], rows.shape[0]
    width = min(FALLBACK_ROWS, n_rows)
    query_block = max(1, min(n_queries, max_elements // n_rows))
    values = torch.empty(n_queries, min(width + 1, n_rows))
    picked = torch.empty(n_queries, values.shape[1], dtype=torch.int64)
    for start in range(0, n_queries, query_block):
        partial = torch.addmm(prepared.norms, queries[start:start + query_block], prepared.rows_t, alpha=-2.0)
        values[start:start + query_block], picked[start:start + query_block] = partial.topk(
            values.shape[1], dim=1, largest=False)
    chosen = picked[:, :width]
    gathered = rows.index_select(0, chosen.flatten()).view(n_queries, width, rows.shape[1])
    distances = torch.linalg.vector_norm(queries.unsqueeze(1) - gathered, dim=2)
    distance = distances.amin(dim=1)
    index = torch.where(distances == distance.unsqueeze(1), chosen, n_rows).amin(dim=1)
    if n_rows > width:
        gamma = 2.0 * (rows.shape[1] + 2) * _FP32_UNIT
        max_norm = float(prepared.norms.max())
        query_norm = torch.linalg.vector_norm(queries, dim=1).double()
        error = gamma * (2.0 * max_norm + 2.0 * query_norm * max_norm ** 0.5)  # |x|² and 2q·x, each fp32
        lower = values[:, -1].double() - error + query_norm.square()
        unproven = (lower <= distance.double().square() * (1.0 + 1e-4) + 1e-12).nonzero().squeeze(1)
        rows64 = rows.double() if unproven.numel() else None
        for start in range(0, unproven.numel(), query_block):  # float64 brute force, as differences
            which = unproven[start:start + query_block]
            exact = torch.cdist(queries[which].double(), rows64, compute_mode="donot_use_mm_for_euclid_dist")
            lowest = exact.min(dim=1, keepdim=True).values
            index[which] = torch.where(exact == lowest, torch.arange(n_rows), n_rows).amin(dim=1)
            distance[which] = torch.linalg.vector_norm(queries[which] - rows.index_select(0, index[which]), dim=1)
    return distance, index


def _candidate_search(queries: torch.Tensor, rows: torch.Tensor, prepared: PreparedBank,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if prepared.int8 is not None:
        return split_rows(int8_search, queries, rows, prepared.int8)
    return _bf16_search(queries, rows, prepared)


def nearest(queries: torch.Tensor, bank: torch.Tensor, bank_norms: torch.Tensor | None = None,
            max_elements: int = EXACT_BLOCK_ELEMENTS, *, bf16: bool | None = None,
            candidates: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance (N,), index (N,)) of each query row's nearest bank row: exact, by the fastest path here.
    `max_elements` bounds the fp32 path's distance blocks (the candidate paths hold a block of queries x M values);
    `candidates` ("int8", "bf16", "fp32"; or `bf16` True/False) forces the candidate path for a new bank (default:
    int8 on CPUs with VNNI, else bf16 on CPUs with native bf16, else fp32)."""
    prepared, rows = prepare(bank, bank_norms, bf16=bf16, candidates=candidates), bank.float()
    queries = queries.float()
    if (prepared.approx_t is None and prepared.int8 is None) or queries.shape[0] == 0:
        return exact_nearest(queries, rows, prepared, max_elements)
    distance, index, proven = _candidate_search(queries, rows, prepared)
    unproven = (~proven).nonzero().squeeze(1)
    if unproven.numel():
        distance[unproven], index[unproven] = _certified_fallback(queries[unproven], rows, prepared, max_elements)
    return distance, index


def unproven_share(queries: torch.Tensor, bank: torch.Tensor) -> float:
    """Share of the queries the int8 / bf16 certificate cannot prove (searched again in fp32); 0 on the fp32 path."""
    prepared = prepare(bank)
    if prepared.approx_t is None and prepared.int8 is None:
        return 0.0
    return float((~_candidate_search(queries.float(), bank.float(), prepared)[2]).float().mean())
