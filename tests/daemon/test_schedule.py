"""`[retraining].schedule`: cron expressions as croniter reads them (5 fields), or intervals; anything else is an
error that says what is expected."""

from __future__ import annotations

import pytest
from croniter import croniter

from daemon.config.schedule import parse_schedule


@pytest.mark.parametrize("expression", ["0 3 * * *", "*/15 * * * *", "0 0 1-5/2 * 1-5", "5,35 8-17 * 1,6 0"])
def test_common_expressions_are_cron_schedules(expression):
    assert croniter.is_valid(expression)
    assert parse_schedule(expression).interval_s is None


@pytest.mark.parametrize("expression", ["0 3 * * MON", "0 0 * * 7", "5-1 * * * *", "@daily 1 2 3 4", "0 0 L * *"])
def test_other_cron_syntax_is_croniter_s_verdict(expression):
    if croniter.is_valid(expression):
        assert parse_schedule(expression).text == expression
    else:
        with pytest.raises(ValueError, match="neither a 5-field cron"):
            parse_schedule(expression)


@pytest.mark.parametrize("expression", ["60 * * * *", "0 24 * * *", "0 0 0 * *", "0 0 * 13 *", "*/0 * * * *",
                                        "0 3 * *", "a b c d e"])
def test_invalid_expressions_are_refused(expression):
    with pytest.raises(ValueError, match="neither a 5-field cron"):
        parse_schedule(expression)
