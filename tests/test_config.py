"""Settings: read once from the environment, every bad value named in its error."""

from __future__ import annotations

from datetime import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fsledger.config import (
    Settings,
    default_database_url,
    parse_bool,
    parse_clock,
    parse_duration,
    parse_int,
)
from fsledger.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("24h", 86400.0),
        ("1h30m", 5400.0),
        ("2d", 172800.0),
        ("250us", 0.00025),
        ("1.5h", 5400.0),
        ("1m30s500ms", 90.5),
        ("0", 0.0),
        ("0s", 0.0),
        ("off", 0.0),
        ("never", 0.0),
        (" 10S ", 10.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration("X", text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", " ", "10", "1x", "h", "-5s", "1h 30m", "5m!", "1.s", "ms"])
def test_bad_duration_names_the_variable(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration("RECONCILIATION_INTERVAL", text)
    assert "RECONCILIATION_INTERVAL" in str(info.value)
    assert repr(text) in str(info.value)


_UNIT_S = {"d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}


@given(st.lists(st.tuples(st.sampled_from(sorted(_UNIT_S)), st.integers(0, 10_000)), min_size=1))
def test_parse_duration_round_trip(parts: list[tuple[str, int]]) -> None:
    text = "".join(f"{n}{unit}" for unit, n in parts)
    expected = sum(n * _UNIT_S[unit] for unit, n in parts)
    assert parse_duration("X", text) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("1", True), ("Yes", True), ("on", True), ("false", False), ("0", False)],
)
def test_parse_bool(text: str, value: bool) -> None:
    assert parse_bool("X", text) is value


def test_bad_bool_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="RECONCILIATION_CALCULATE_HASHES='maybe'"):
        parse_bool("RECONCILIATION_CALCULATE_HASHES", "maybe")


def test_parse_int() -> None:
    assert parse_int("X", " 42 ", 1, 100) == 42
    with pytest.raises(ConfigError, match="X='4.2' is not a whole number"):
        parse_int("X", "4.2", 1, 100)
    with pytest.raises(ConfigError, match="out of range"):
        parse_int("X", "0", 1, 100)
    with pytest.raises(ConfigError, match="out of range"):
        parse_int("X", "101", 1, 100)


def test_parse_clock() -> None:
    assert parse_clock("X", "02:00") == time(2, 0)
    assert parse_clock("X", "23:59") == time(23, 59)
    assert parse_clock("X", "7:05") == time(7, 5)
    for off in ("", "off", "none", "never"):
        assert parse_clock("X", off) is None
    for bad in ("24:00", "12:60", "noon", "12", "12:5"):
        with pytest.raises(ConfigError, match="RECONCILIATION_DAILY_AT"):
            parse_clock("RECONCILIATION_DAILY_AT", bad)


def test_defaults() -> None:
    s = Settings.from_env({"HOME": "/home/u"})
    assert s.database_url == "sqlite:///home/u/.local/share/fsledger/fsledger.db"
    assert s.reconciliation_interval_s == 86400.0
    assert s.daily_at == time(2, 0)
    assert s.debounce_s == 0.5
    assert s.batch_size == 100
    assert s.calculate_hashes is True
    assert s.hash_algo == "blake3"
    assert s.log_level == "INFO"
    assert s.max_concurrency >= 1


def test_default_database_url_honours_xdg() -> None:
    url = default_database_url({"XDG_DATA_HOME": "/data", "HOME": "/home/u"})
    assert url == "sqlite:///data/fsledger/fsledger.db"


def test_from_env_reads_every_variable() -> None:
    env = {
        "FSLEDGER_DATABASE_URL": "postgresql://db/x",
        "RECONCILIATION_INTERVAL": "1h30m",
        "RECONCILIATION_DAILY_AT": "off",
        "FILE_WATCHER_DEBOUNCE": "250ms",
        "RECONCILIATION_BATCH_SIZE": "500",
        "RECONCILIATION_MAX_CONCURRENCY": "3",
        "RECONCILIATION_CALCULATE_HASHES": "false",
        "RECONCILIATION_DISTRIBUTED": "yes",
        "FSLEDGER_HASH_ALGO": "sha256",
        "FSLEDGER_HASH_TIMEOUT": "2m",
        "FSLEDGER_LOG_LEVEL": "debug",
    }
    s = Settings.from_env(env)
    assert s == Settings(
        database_url="postgresql://db/x",
        reconciliation_interval_s=5400.0,
        daily_at=None,
        debounce_s=0.25,
        batch_size=500,
        max_concurrency=3,
        calculate_hashes=False,
        distributed=True,
        hash_algo="sha256",
        hash_timeout_s=120.0,
        log_level="DEBUG",
    )


def test_interval_zero_turns_periodic_scans_off() -> None:
    assert Settings.from_env({"RECONCILIATION_INTERVAL": "0"}).reconciliation_interval_s == 0.0


def test_overrides_win_and_none_means_unset() -> None:
    env = {"RECONCILIATION_BATCH_SIZE": "500", "FSLEDGER_DATABASE_URL": "sqlite:///x.db"}
    s = Settings.from_env(env, batch_size=7, database_url=None)
    assert s.batch_size == 7
    assert s.database_url == "sqlite:///x.db"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RECONCILIATION_INTERVAL", "daily"),
        ("RECONCILIATION_DAILY_AT", "25:00"),
        ("FILE_WATCHER_DEBOUNCE", "fast"),
        ("RECONCILIATION_BATCH_SIZE", "lots"),
        ("RECONCILIATION_BATCH_SIZE", "0"),
        ("RECONCILIATION_MAX_CONCURRENCY", "1000"),
        ("RECONCILIATION_CALCULATE_HASHES", "perhaps"),
        ("RECONCILIATION_DISTRIBUTED", "sometimes"),
        ("FSLEDGER_HASH_ALGO", "md5"),
        ("FSLEDGER_HASH_TIMEOUT", "1 minute"),
        ("FSLEDGER_LOG_LEVEL", "LOUD"),
    ],
)
def test_bad_values_name_their_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({variable: value})
    assert variable in str(info.value)
    assert info.value.exit_code == 2


def test_settings_are_frozen() -> None:
    s = Settings(database_url="sqlite:///x")
    with pytest.raises(AttributeError):
        s.batch_size = 5  # type: ignore[misc]


def test_schedule_settings_from_env() -> None:
    s = Settings.from_env(
        {
            "FSLEDGER_DATABASE_URL": "sqlite:///x.db",
            "RECONCILIATION_DAILY_AT": "auto",
            "FSLEDGER_SCHEDULE_MAX_DEFERRAL": "3h",
            "FSLEDGER_SCHEDULE_BUSY_CHANGES": "120",
            "FSLEDGER_SCHEDULE_BUSY_IO_PRESSURE": "35",
            "FSLEDGER_SCHEDULE_BUSY_CPU_PRESSURE": "80",
            "FSLEDGER_INTERVAL_MIN": "2h",
            "FSLEDGER_INTERVAL_MAX": "3d",
            "FSLEDGER_ADAPTIVE_INTERVAL": "off",
            "FSLEDGER_GENTLE_SCANS": "false",
        }
    )
    assert s.daily_auto and s.daily_at == time(2, 0)  # 02:00 until history exists
    assert s.schedule_max_deferral_s == 3 * 3600 and s.schedule_busy_changes == 120
    assert (s.schedule_busy_io_pressure, s.schedule_busy_cpu_pressure) == (35, 80)
    assert (s.interval_min_s, s.interval_max_s) == (7200, 3 * 86400)
    assert not s.adaptive_interval and not s.gentle_scans
    with pytest.raises(ConfigError, match="FSLEDGER_SCHEDULE_BUSY_IO_PRESSURE"):
        Settings.from_env({"FSLEDGER_SCHEDULE_BUSY_IO_PRESSURE": "101"})
    with pytest.raises(ConfigError, match="FSLEDGER_INTERVAL_MIN"):
        Settings.from_env({"FSLEDGER_INTERVAL_MIN": "2d", "FSLEDGER_INTERVAL_MAX": "1d"})


def test_a_webhook_secret_that_is_not_utf8_is_its_bytes() -> None:
    """The environment hands a variable's bytes over as surrogate escapes: the key is those
    bytes, not a crash (found by the fault suite's config fuzzing)."""
    from fsledger.config import webhook_key

    raw = b"\xff" * 8 + b"sixteen-bytes-ok"
    assert webhook_key(raw.decode("utf-8", "surrogateescape")) == raw
    settings = Settings.from_env(
        {"FSLEDGER_WEBHOOK_SECRET": raw.decode("utf-8", "surrogateescape")}
    )
    assert settings is not None
