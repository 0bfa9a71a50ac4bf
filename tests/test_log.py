"""Logging: one format (time, role, level) for every process; -v/-q and PSGD_LOG_LEVEL."""

import logging
import re

import pytest

from psgd import log


@pytest.mark.parametrize("verbose,quiet,env,expected", [
    (0, 0, "", logging.INFO), (1, 0, "", logging.DEBUG), (0, 1, "", logging.WARNING), (0, 2, "", logging.ERROR),
    (0, 0, "warning", logging.WARNING), (1, 0, "WARNING", logging.INFO), (5, 0, "", logging.DEBUG),
])
def test_the_level_from_flags_and_environment(verbose, quiet, env, expected):
    assert log.level_from(verbose, quiet, env) == expected


def test_an_unknown_level_is_refused():
    with pytest.raises(ValueError, match="PSGD_LOG_LEVEL"):
        log.level_from(env="loud")


def test_every_line_has_time_role_and_level(capsys, monkeypatch):
    monkeypatch.delenv(log.LEVEL_ENV, raising=False)
    log.setup("server", logging.INFO)
    logging.getLogger("psgd.server.loop").info("resumed from x at version 3")
    logging.getLogger("psgd.worker.loop").debug("not shown at INFO")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} server INFO resumed from x at version 3", err[0])
    import os
    assert os.environ[log.LEVEL_ENV] == "INFO"  # children of a launcher inherit the level
