"""Settings, read once at the edge (environment, options) into one frozen object.

The environment variable names are the seed design's: RECONCILIATION_INTERVAL,
FILE_WATCHER_DEBOUNCE, RECONCILIATION_BATCH_SIZE, RECONCILIATION_MAX_CONCURRENCY,
RECONCILIATION_CALCULATE_HASHES, plus FSLEDGER_* for fsledger's own (and
FILE_WATCHER_MAX_WRITE_HOLD).
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import time

from fsledger.entry import LOG_LEVELS, env_database_url

# The database's setting is read where the console script's fast path reads it too.
from fsledger.entry import default_database_url as default_database_url
from fsledger.errors import ConfigError

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|us|s|m|h|d)")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


MAX_DURATION_S = 3650 * 86400.0
"""The longest duration a setting may have (ten years): a wait longer than the platform's
timers can hold would crash whatever waits on it."""


def parse_duration(name: str, value: str, max_s: float | None = None) -> float:
    """Parse a duration such as ``500ms``, ``30s``, ``5m``, ``24h``, ``1h30m`` or ``0``, in seconds.

    Raises:
        ConfigError: naming ``name`` and the expected form, or the value is longer than
            ``max_s`` (or too long to be a number at all).
    """
    text = value.strip().lower()
    if text in ("0", "off", "never"):
        return 0.0
    pos, total = 0, 0.0
    for m in _DURATION_RE.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ConfigError(
            f"{name}={value!r} is not a duration: expected e.g. 500ms, 30s, 5m, 24h, 1h30m or 0"
        )
    if not math.isfinite(total) or (max_s is not None and total > max_s):
        limit = f"{max_s / 86400:.0f}d" if max_s is not None else "a finite duration"
        raise ConfigError(f"{name}={value!r} is too long: expected at most {limit}")
    return total


def parse_bool(name: str, value: str) -> bool:
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean: expected true or false")


def parse_int(name: str, value: str, minimum: int, maximum: int) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a whole number") from None
    if not minimum <= number <= maximum:
        raise ConfigError(f"{name}={value!r} is out of range: expected {minimum}..{maximum}")
    return number


def parse_number(name: str, value: str, minimum: float, maximum: float) -> float:
    try:
        number = float(value.strip())
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a number") from None
    if not minimum <= number <= maximum:
        raise ConfigError(f"{name}={value!r} is out of range: expected {minimum:g}..{maximum:g}")
    return number


def parse_clock(name: str, value: str) -> time | None:
    text = value.strip().lower()
    if text in ("", "off", "none", "never"):
        return None
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", text)
    if not m or int(m.group(1)) > 23 or int(m.group(2)) > 59:
        raise ConfigError(f"{name}={value!r} is not a time of day: expected HH:MM or off")
    return time(int(m.group(1)), int(m.group(2)))


WEBHOOK_SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 16


def webhook_key(secret: str) -> bytes:
    """The HMAC key of a webhook secret: the decoded bytes of ``whsec_BASE64`` (Standard
    Webhooks' form, what its libraries take), else the secret's UTF-8 bytes.

    Raises:
        ConfigError: the secret is not valid base64 after ``whsec_``, or its key is shorter
            than 16 bytes (a short key can be guessed from one signed delivery).
    """
    if secret.startswith(WEBHOOK_SECRET_PREFIX):
        text = secret[len(WEBHOOK_SECRET_PREFIX) :]
        try:
            key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(
                "FSLEDGER_WEBHOOK_SECRET starts with 'whsec_' but the rest is not base64"
            ) from None
    else:
        # The variable's bytes as the environment holds them (os.environ decodes them with
        # surrogateescape): a key that is not UTF-8 is still a key.
        key = secret.encode("utf-8", "surrogateescape")
    if len(key) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"FSLEDGER_WEBHOOK_SECRET is too short ({len(key)} bytes): use at least "
            f"{MIN_SECRET_BYTES} random bytes, e.g. from 'python3 -c \"import base64, os; "
            "print('whsec_' + base64.b64encode(os.urandom(32)).decode())\"'"
        )
    return key


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything configurable, with the seed's defaults."""

    database_url: str = field(repr=False)
    """May hold a password: kept out of ``repr`` (and so out of any log of the settings)."""
    reconciliation_interval_s: float = 24 * 3600.0
    """0 turns periodic reconciliation off (startup and recovery reconciliations still run)."""
    daily_at: time | None = time(2, 0)
    """Local time of the daily reconciliation; None turns it off."""
    daily_auto: bool = False
    """``RECONCILIATION_DAILY_AT=auto``: the daily run moves to the local hour the feed's
    history shows quietest (``daily_at`` is the fallback until 7 days of history exist)."""
    schedule_max_deferral_s: float = 6 * 3600.0
    """How long past due a scheduled reconciliation may wait for a quiet system."""
    schedule_busy_changes: float = 600.0
    """Changes per minute in a repository above which it counts as busy (an import)."""
    schedule_busy_io_pressure: float = 20.0
    """``/proc/pressure/io`` some avg60 (percent) above which the system counts as busy."""
    schedule_busy_cpu_pressure: float = 60.0
    """``/proc/pressure/cpu`` some avg60 (percent) above which the system counts as busy."""
    schedule_activity_window_s: float = 60.0
    """The window over which a repository's changes per minute are measured."""
    adaptive_interval: bool = True
    """Scheduled reconciliations that find drift come sooner, clean ones later."""
    interval_min_s: float = 3600.0
    interval_max_s: float = 7 * 86400.0
    gentle_scans: bool = True
    """Scheduled reconciliations hash at idle I/O priority and nice 10."""
    debounce_s: float = 0.5
    write_hold_s: float = 30.0
    """How long the watcher may hold back a file written and not closed since, while a
    process still has it open for writing (a writer stalled longer than the debounce): it
    is not recorded at a partial size. A file kept open for good (a log) is recorded when
    this is over, and again after later writes. Zero: the debounce alone decides."""
    batch_size: int = 100
    max_concurrency: int = os.cpu_count() or 1
    calculate_hashes: bool = True
    distributed: bool = False
    """PostgreSQL: split a reconciliation into work items other agents help with, and help with
    theirs (``fsledger.distscan``). Ignored with SQLite."""
    hash_algo: str = "blake3"
    hash_timeout_s: float = 60.0
    """Minimum time one file's hash may take before it is abandoned (plus 20 s per GiB)."""
    log_level: str = "INFO"
    listen: str = "127.0.0.1:8750"
    """Where ``fsledger run`` serves HTTP (HOST:PORT)."""
    api_token: str | None = field(default=None, repr=False)
    """Bearer token of the HTTP API; required to listen beyond loopback."""
    webhooks: tuple[str, ...] = ()
    """URLs that receive batches of the change feed."""
    webhook_secret: str | None = field(default=None, repr=False)
    """Key of the Standard Webhooks signature on every delivery: ``whsec_BASE64`` (the
    specification's form) or any other text of at least 16 bytes, used as it is (see
    ``webhook_key``)."""
    webhook_from: str = "now"
    """Where a webhook without a stored cursor starts: ``now`` (the head), ``start`` (the
    oldest entry kept) or a cursor."""
    feed_retention_s: float = 30 * 86400.0
    """Change-feed entries older than this are pruned; 0 keeps them by age."""
    feed_retention_entries: int = 1_000_000
    """At most this many recent sequence numbers are kept; 0 keeps them by count."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from environment variables, then apply explicit overrides.

        Raises:
            ConfigError: a variable has a value that cannot be used; the message names it.
        """
        env = os.environ if env is None else env
        kw: dict[str, object] = {"database_url": env_database_url(env)}
        if v := env.get("RECONCILIATION_INTERVAL"):
            kw["reconciliation_interval_s"] = parse_duration(
                "RECONCILIATION_INTERVAL", v, MAX_DURATION_S
            )
        if (v := env.get("RECONCILIATION_DAILY_AT")) is not None:
            if v.strip().lower() == "auto":
                kw["daily_auto"] = True
            else:
                kw["daily_at"] = parse_clock("RECONCILIATION_DAILY_AT", v)
        for var, key in (
            ("FSLEDGER_SCHEDULE_MAX_DEFERRAL", "schedule_max_deferral_s"),
            ("FSLEDGER_SCHEDULE_ACTIVITY_WINDOW", "schedule_activity_window_s"),
            ("FSLEDGER_INTERVAL_MIN", "interval_min_s"),
            ("FSLEDGER_INTERVAL_MAX", "interval_max_s"),
        ):
            if v := env.get(var):
                kw[key] = parse_duration(var, v, MAX_DURATION_S)
        for var, key, top in (
            ("FSLEDGER_SCHEDULE_BUSY_CHANGES", "schedule_busy_changes", 1e9),
            ("FSLEDGER_SCHEDULE_BUSY_IO_PRESSURE", "schedule_busy_io_pressure", 100.0),
            ("FSLEDGER_SCHEDULE_BUSY_CPU_PRESSURE", "schedule_busy_cpu_pressure", 100.0),
        ):
            if v := env.get(var):
                kw[key] = parse_number(var, v, 0.0, top)
        if v := env.get("FSLEDGER_ADAPTIVE_INTERVAL"):
            kw["adaptive_interval"] = parse_bool("FSLEDGER_ADAPTIVE_INTERVAL", v)
        if v := env.get("FSLEDGER_GENTLE_SCANS"):
            kw["gentle_scans"] = parse_bool("FSLEDGER_GENTLE_SCANS", v)
        if v := env.get("FILE_WATCHER_DEBOUNCE"):
            kw["debounce_s"] = parse_duration("FILE_WATCHER_DEBOUNCE", v, MAX_DURATION_S)
        if v := env.get("FILE_WATCHER_MAX_WRITE_HOLD"):
            kw["write_hold_s"] = parse_duration("FILE_WATCHER_MAX_WRITE_HOLD", v, MAX_DURATION_S)
        if v := env.get("RECONCILIATION_BATCH_SIZE"):
            kw["batch_size"] = parse_int("RECONCILIATION_BATCH_SIZE", v, 1, 1_000_000)
        if v := env.get("RECONCILIATION_MAX_CONCURRENCY"):
            kw["max_concurrency"] = parse_int("RECONCILIATION_MAX_CONCURRENCY", v, 1, 256)
        if v := env.get("RECONCILIATION_CALCULATE_HASHES"):
            kw["calculate_hashes"] = parse_bool("RECONCILIATION_CALCULATE_HASHES", v)
        if v := env.get("RECONCILIATION_DISTRIBUTED"):
            kw["distributed"] = parse_bool("RECONCILIATION_DISTRIBUTED", v)
        if v := env.get("FSLEDGER_HASH_ALGO"):
            from fsledger.hashing import ALGORITHMS  # only when set: hashing is heavy to load

            if v not in ALGORITHMS:
                raise ConfigError(
                    f"FSLEDGER_HASH_ALGO={v!r} is not supported: expected one of "
                    + ", ".join(sorted(ALGORITHMS))
                )
            kw["hash_algo"] = v
        if v := env.get("FSLEDGER_HASH_TIMEOUT"):
            kw["hash_timeout_s"] = parse_duration("FSLEDGER_HASH_TIMEOUT", v, MAX_DURATION_S)
        if v := env.get("FSLEDGER_LOG_LEVEL"):
            if v.upper() not in LOG_LEVELS:
                raise ConfigError(
                    f"FSLEDGER_LOG_LEVEL={v!r} is not a log level: expected DEBUG, INFO, "
                    "WARNING or ERROR"
                )
            kw["log_level"] = v.upper()
        if v := env.get("FSLEDGER_LISTEN"):
            kw["listen"] = v
        if v := env.get("FSLEDGER_API_TOKEN"):
            if len(v) < 16:
                raise ConfigError(
                    "FSLEDGER_API_TOKEN is too short: use at least 16 random characters "
                    "(e.g. from 'python3 -c \"import secrets; print(secrets.token_urlsafe())\"')"
                )
            kw["api_token"] = v
        if v := env.get("FSLEDGER_WEBHOOKS"):
            kw["webhooks"] = tuple(u for u in re.split(r"[\s,]+", v) if u)
        if v := env.get("FSLEDGER_WEBHOOK_SECRET"):
            webhook_key(v)  # refused here, at the edge, when it is too short or malformed
            kw["webhook_secret"] = v
        if v := env.get("FSLEDGER_FEED_RETENTION"):
            kw["feed_retention_s"] = parse_duration("FSLEDGER_FEED_RETENTION", v, MAX_DURATION_S)
        if v := env.get("FSLEDGER_FEED_RETENTION_ENTRIES"):
            kw["feed_retention_entries"] = parse_int(
                "FSLEDGER_FEED_RETENTION_ENTRIES", v, 0, 1 << 62
            )
        floor, ceiling = kw.get("interval_min_s", 3600.0), kw.get("interval_max_s", 7 * 86400.0)
        if isinstance(floor, float) and isinstance(ceiling, float) and floor > ceiling:
            raise ConfigError(
                "FSLEDGER_INTERVAL_MIN is longer than FSLEDGER_INTERVAL_MAX: the adaptive "
                "interval needs a floor at or below its ceiling"
            )
        settings = cls(**kw)  # type: ignore[arg-type]
        clean = {k: v for k, v in overrides.items() if v is not None}
        return replace(settings, **clean) if clean else settings  # type: ignore[arg-type]
