"""int8 candidates for the exact nearest-neighbour search (CPUs with VNNI): `prepare_int8`, `int8_search`.

The bank and the queries are centred on the bank's mean, turned by a fixed random rotation (distances are kept; the
rotation spreads each row over all coordinates, so that one int8 scale fits every coordinate) and rounded to int8
with one scale s: q̃ = s·qi, x̃ = s·xi. Integer products are exact, so the distance between the roundings,
d̃ = s·|qi - xi|, is known exactly, and the triangle inequality bounds the true one: d ≥ d̃ - |q̃ - q| - |x̃ - x|.
That bound is the whole certificate (no floating-point accumulation error to bound, unlike bf16).

One int8 product per block of queries gives p = qi·xi - h with h = ⌊(|xi|² - n0)/2⌋ folded in as extra int8
columns (base-127 digits of -h against constant query columns), so that d̃² = |qi|² + n0 - 2p + (0 or 1): the
largest p is the nearest row. Rows are in GROUP strided groups (group g: rows g, g + G, ...; in a full bank that is
one patch position across the references); the group maximum is the only other pass over the (queries x bank)
matrix. The best groups' rows are ranked by p, the best RECHECK re-checked in fp32 (as differences); every other row
has p at most the next value of the selection, which bounds its distance from below and proves the query when that
bound exceeds the best re-checked distance. Unproven queries re-check RECHECK_WIDE rows of the same selection; the
caller searches the rest again exactly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

GROUP = 16  # bank rows per group
CANDIDATE_GROUPS = 15  # top-16 (15 + the next) runs ~1.7x faster than top-17 in torch.topk on CPU
RECHECK = 8  # rows re-checked in fp32 per query
RECHECK_WIDE = 64  # rows re-checked for the queries RECHECK does not prove
QUERY_BLOCK = 256  # queries per int8 product: its int32 output is read back while still in cache
_INT8_MAX = 127
# relative fp32 slack of the rotation, centring and re-check (sums of D terms: D·2^-24 ≈ 1e-5)
_FP32_SLACK = 4e-5


@functools.cache
def cpu_has_vnni() -> bool:
    """Whether this CPU multiplies int8 natively (AVX512-VNNI, AVX-VNNI or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


@functools.cache
def int8_product_works() -> bool:
    """Whether `torch._int_mm` (a private operator) runs here and is exact; else another path is used."""
    try:
        a = torch.full((32, 160), 127, dtype=torch.int8)
        return bool(torch._int_mm(a, a.t()).eq(160 * 127 * 127).all())
    except (RuntimeError, AttributeError, TypeError):
        return False


@dataclass
class Int8Bank:
    """A bank rounded to int8 in rotated, centred coordinates, with its folded norms."""

    mean: torch.Tensor  # (D,) fp32
    rotation: torch.Tensor  # (D, D) fp32, orthogonal
    scale: float
    rows: torch.Tensor  # (M padded, D + digits) int8: [xi, digits of -h]
    query_columns: torch.Tensor  # (digits,) int8: the constant query columns the digits multiply
    offset: int  # n0
    max_rounding: float  # max |x̃ - x| over the rows, plus fp32 slack
    n_rows: int  # M (positions ≥ M are copies of row 0)


def prepare_int8(rows: torch.Tensor) -> Int8Bank | None:
    """The int8 form of `rows` (M, D) finite fp32 on the CPU (M ≥ GROUP · (CANDIDATE_GROUPS + 1)), or None when the
    rows' norms spread so far that folding them in would add more than D/8 columns (then another path is used)."""
    n_rows, dim = rows.shape
    centred = rows.double() - rows.double().mean(dim=0)
    generator = torch.Generator().manual_seed(dim)  # fixed: the same bank gives the same int8 form
    rotation = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))[0]
    turned = centred @ rotation
    scale = float(turned.abs().max()) / _INT8_MAX or 1.0
    rounded = (turned / scale).round_().clamp_(-_INT8_MAX, _INT8_MAX)
    rounding = (rounded * scale - turned).norm(dim=1)
    norms = rounded.pow(2).sum(dim=1).to(torch.int64)
    offset = int(norms.min() + norms.max()) // 2
    half = torch.div(norms - offset, 2, rounding_mode="floor")  # h, |h| ≤ 152·127²/4
    # -h = 127·(coarse digits) + fine digit, each within ±127
    coarse_total = torch.div(-half + 63, 127, rounding_mode="floor")
    fine = -half - 127 * coarse_total
    n_coarse = max(1, -(-int(coarse_total.abs().max()) // _INT8_MAX))
    if n_coarse > max(4, dim // 8):
        return None
    digits = torch.empty(n_rows, n_coarse + 1, dtype=torch.int64)
    remaining = coarse_total.clone()
    for column in range(n_coarse):
        digits[:, column] = remaining.clamp(-_INT8_MAX, _INT8_MAX)
        remaining -= digits[:, column]
    digits[:, -1] = fine
    padded = -(-n_rows // GROUP) * GROUP
    table = torch.cat((rounded.to(torch.int64), digits), dim=1).to(torch.int8)
    table = torch.cat((table, table[:1].expand(padded - n_rows, -1)))  # padding: copies of row 0
    query_columns = torch.tensor([_INT8_MAX] * n_coarse + [1], dtype=torch.int8)
    return Int8Bank(mean=rows.double().mean(dim=0).float(), rotation=rotation.float(), scale=scale,
                    rows=table.contiguous(), query_columns=query_columns, offset=offset,
                    max_rounding=float(rounding.max()) + _FP32_SLACK * float(centred.norm(dim=1).max()),
                    n_rows=n_rows)


def _recheck(queries: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, n_rows: int,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (distance, lowest bank index at it) of each query among its candidate positions (as differences)."""
    originals = torch.where(positions < n_rows, positions, 0)  # padding positions are copies of row 0
    # index_select, not rows[originals]: advanced indexing copies 20x slower on CPU
    gathered = rows.index_select(0, originals.flatten()).view(*originals.shape, rows.shape[1])
    distances = torch.linalg.vector_norm(queries.unsqueeze(1) - gathered, dim=2)
    nearest = distances.amin(dim=1)
    return nearest, torch.where(distances == nearest.unsqueeze(1), originals, n_rows).amin(dim=1)


def int8_search(queries: torch.Tensor, rows: torch.Tensor, bank: Int8Bank,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(distance, index, proven) of each query (fp32 (N, D)); `proven[i]` False: search query i again exactly."""
    n_queries = queries.shape[0]
    turned = (queries - bank.mean) @ bank.rotation
    quantised = (turned / bank.scale).round_().clamp_(-_INT8_MAX, _INT8_MAX)
    query_rounding = torch.linalg.vector_norm(quantised * bank.scale - turned, dim=1)
    query_norms = quantised.square().sum(dim=1).to(torch.int64)
    int_queries = torch.cat((quantised.to(torch.int8), bank.query_columns.expand(n_queries, -1)), dim=1)
    rows_t = bank.rows.t()
    n_groups = bank.rows.shape[0] // GROUP
    offsets = torch.arange(GROUP) * n_groups
    n_members = CANDIDATE_GROUPS * GROUP
    members = torch.empty(n_queries, n_members, dtype=torch.int64)
    member_values = torch.empty(n_queries, n_members, dtype=torch.int32)
    group_next = torch.empty(n_queries, dtype=torch.int32)
    for start in range(0, n_queries, QUERY_BLOCK):
        block = slice(start, start + QUERY_BLOCK)
        products = torch._int_mm(int_queries[block], rows_t)  # (n, M) int32, exact
        group_best = products.view(products.shape[0], GROUP, n_groups).amax(dim=1)
        group_values, groups = group_best.topk(CANDIDATE_GROUPS + 1, dim=1)
        members[block] = (groups[:, :CANDIDATE_GROUPS, None] + offsets).flatten(1)
        member_values[block] = products.gather(1, members[block])
        group_next[block] = group_values[:, -1]
    centred_norm = torch.linalg.vector_norm(turned, dim=1).double()
    slack = query_rounding.double() + bank.max_rounding + _FP32_SLACK * centred_norm

    def certified(width: int, which: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        values, picked = (member_values if which is None else member_values[which]).topk(width + 1, dim=1)
        chosen = (members if which is None else members[which]).gather(1, picked[:, :width])
        distance, index = _recheck(queries if which is None else queries[which], rows, chosen, bank.n_rows)
        # every row not re-checked has p ≤ next: d̃² ≥ |qi|² + n0 - 2·next, and d ≥ d̃ - slack
        following = torch.maximum(values[:, -1], group_next if which is None else group_next[which])
        squared = (query_norms if which is None else query_norms[which]) + bank.offset - 2 * following.to(torch.int64)
        lower = bank.scale * squared.clamp_(min=0).double().sqrt() - (slack if which is None else slack[which])
        return distance, index, lower > distance.double() * (1.0 + _FP32_SLACK) + 1e-6

    distance, index, proven = certified(RECHECK, None)
    again = (~proven).nonzero().squeeze(1)
    if again.numel():
        distance[again], index[again], proven[again] = certified(min(RECHECK_WIDE, n_members - 1), again)
    return distance, index, proven
