"""`daemon.schedule.plain_cron_is_valid` decides the common cron expressions without importing croniter (config
validation runs in every operator command); it must never accept one that croniter refuses."""

from __future__ import annotations

import random

import pytest
from croniter import croniter

from daemon.schedule import _FIELD_RANGES, parse_schedule, plain_cron_is_valid


def _item(rng: random.Random, lowest: int, highest: int) -> str:
    kind = rng.randrange(6)
    def value() -> int:  # out of range now and then, on purpose
        return rng.randint(lowest - 1, highest + 1) if rng.random() < 0.2 else rng.randint(lowest, highest)

    if kind == 0:
        return "*"
    if kind == 1:
        return f"*/{rng.randint(0, highest - lowest + 3)}"
    if kind == 2:
        return str(value())
    low, high = value(), value()
    if kind == 3:
        return f"{low}-{high}"
    if kind == 4:
        return f"{low}-{high}/{rng.randint(0, highest - lowest + 3)}"
    return f"{low}/{rng.randint(1, 9)}"


def test_plain_cron_check_never_accepts_what_croniter_refuses():
    rng = random.Random(20261201)
    accepted = refused_here_only = 0
    for _ in range(4000):
        fields = [",".join(_item(rng, lo, hi) for _ in range(rng.choice((1, 1, 2, 3)))) for lo, hi in _FIELD_RANGES]
        expression = " ".join(fields)
        if plain_cron_is_valid(expression):
            accepted += 1
            assert croniter.is_valid(expression), expression
        elif croniter.is_valid(expression):
            refused_here_only += 1  # left to croniter: parse_schedule still accepts it
    assert accepted > 40 and refused_here_only > 40  # both ways are exercised (a fixed seed: the same sample)


@pytest.mark.parametrize("expression", ["0 3 * * *", "*/15 * * * *", "0 0 1-5/2 * 1-5", "5,35 8-17 * 1,6 0"])
def test_common_expressions_are_decided_here(expression):
    assert plain_cron_is_valid(expression) and croniter.is_valid(expression)
    assert parse_schedule(expression).interval_s is None


@pytest.mark.parametrize("expression", ["0 3 * * MON", "0 0 * * 7", "5-1 * * * *", "@daily 1 2 3 4", "0 0 L * *"])
def test_other_cron_syntax_goes_to_croniter(expression):
    assert not plain_cron_is_valid(expression)
    if croniter.is_valid(expression):
        assert parse_schedule(expression).text == expression
    else:
        with pytest.raises(ValueError, match="neither a 5-field cron"):
            parse_schedule(expression)


@pytest.mark.parametrize("expression", ["60 * * * *", "0 24 * * *", "0 0 0 * *", "0 0 * 13 *", "*/0 * * * *",
                                        "0 3 * *", "a b c d e"])
def test_invalid_expressions_are_refused(expression):
    assert not plain_cron_is_valid(expression)
    with pytest.raises(ValueError, match="neither a 5-field cron"):
        parse_schedule(expression)
