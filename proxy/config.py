"""Settings: frozen dataclasses, loaded from defaults < TOML file < environment < CLI flags.

Every key of every section can be set in the file (``[auth] client_id = "..."``), overridden by
``SPARKS_PROXY_<SECTION>_<KEY>`` in the environment and, for a few keys, by command-line flags.
Loading never exits the process: it raises :class:`~proxy.errors.ConfigError` with a one-line
message naming the key and what is expected; only ``__main__`` turns that into an exit status.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import math
import os
import re
import ssl
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

ENV_PREFIX = "SPARKS_PROXY_"
CONFIG_ENV = "SPARKS_PROXY_CONFIG"
DEFAULT_CONFIG_PATH = "config.toml"


class Secret:
    """A string that never shows itself in reprs, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str = "") -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself: call this only where it is sent to the token endpoint."""
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "<SECRET>" if self._value else "<SECRET unset>"

    __str__ = __repr__


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """The listener: where the proxy accepts connections and how long it waits on them."""

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    """Processes serving the port together (SO_REUSEPORT), sharing one token."""
    allowed_hosts: str = "localhost,127.0.0.1,::1"
    """Comma-separated Host names served (421 for others; "*" for any): defeats DNS rebinding."""
    shutdown_grace: float = 10.0
    """Seconds in-flight requests get to finish after SIGTERM/SIGINT."""
    drain_delay: float = 0.0
    """Seconds between failing readiness and closing the listener on SIGTERM (0: at once)."""
    keepalive_timeout: float = 75.0
    """Seconds an idle client connection stays open waiting for its next request."""
    header_timeout: float = 10.0
    """Seconds a client may take from the first byte of a request to the end of its head."""
    body_timeout: float = 60.0
    """Longest wait for the next request-body byte from the client (408 after it)."""
    send_timeout: float = 60.0
    """Longest wait for a client to take more of an answer before the connection is cut."""
    max_connections: int = 1024
    """Most client connections open at once; more are answered 503 and closed."""
    max_body_size: int = 0
    """Largest request body accepted, in bytes (413 above it); 0 means no limit."""
    max_line_size: int = 8192
    """Longest request line (414 above it); keep it apart from max_field_size."""
    max_field_size: int = 8190
    """Longest header line (431 above it)."""
    max_headers: int = 128
    """Most header lines in one request (431 above it)."""


@dataclass(frozen=True, kw_only=True)
class UpstreamSettings:
    """The Sparks API the proxy forwards to."""

    url: str = "https://api.logicdrop.io"
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    """Longest wait for the next byte from the upstream (headers or body); not a transfer cap."""
    ca_file: str = ""
    trust_env: bool = False
    """Honour HTTPS_PROXY/NO_PROXY (corporate egress) for upstream and token endpoint."""
    pool_size: int = 100
    """Most connections open to the upstream at once."""
    pool_timeout: float = 10.0
    """Longest wait for a free pooled connection before answering 503."""
    replay_body_limit: int = 65536
    """Request bodies up to this size are buffered so a 401 can be retried with a new token."""


@dataclass(frozen=True, kw_only=True)
class AuthSettings:
    """The machine credential and how tokens are obtained with it."""

    token_url: str = "https://auth.logicdrop.io/oauth/token"
    client_id: str = ""
    client_secret: Secret = field(default_factory=Secret)
    client_secret_file: str = ""
    audience: str = "https://api.logicdrop.io"
    scope: str = ""
    request_format: str = "json"
    client_auth: str = "post"
    refresh_margin: float = 0.0
    """Seconds before expiry to refresh; 0: the smaller of 300 s and a tenth of the lifetime."""
    token_cache: str = "memory"
    """memory, file (auth.token_cache_file) or redis (auth.redis_url): where tokens are shared."""
    token_cache_file: str = ""
    redis_url: str = ""
    """redis://[:password@]host:port/db for token_cache = "redis"; or use redis_url_file."""
    redis_url_file: str = ""
    """A file holding the Redis URL (a Kubernetes Secret when it carries a password)."""
    redis_key_prefix: str = "sparks-proxy:token:"
    redis_encryption_key_file: str = ""
    """A file with a base64 AES key (16, 24 or 32 bytes): tokens in Redis are encrypted."""
    timeout: float = 10.0
    """Longest a single token request may take."""
    max_backoff: float = 30.0
    """Cap on the wait between failed token requests."""


@dataclass(frozen=True, kw_only=True)
class LogSettings:
    """Logging: level, line format, and whether to write one access line per request."""

    level: str = "info"
    format: str = "text"
    access: bool = True


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the proxy needs to run, validated."""

    server: ServerSettings = field(default_factory=ServerSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    log: LogSettings = field(default_factory=LogSettings)

    @property
    def has_credentials(self) -> bool:
        """Whether a client id and a secret (inline or from a file) are configured."""
        return bool(
            self.auth.client_id and (self.auth.client_secret or self.auth.client_secret_file)
        )


SECTIONS: dict[str, type] = {
    "server": ServerSettings,
    "upstream": UpstreamSettings,
    "auth": AuthSettings,
    "log": LogSettings,
}

CHOICES: dict[str, tuple[str, ...]] = {
    "auth.token_cache": ("memory", "file", "redis"),
    "auth.request_format": ("json", "form"),
    "auth.client_auth": ("post", "basic"),
    "log.level": ("debug", "info", "warning", "error"),
    "log.format": ("json", "text"),
}

# Names Kubernetes injects for Services ("docker links" style), never settings of ours.
_SERVICE_LINK = re.compile(
    r"_SERVICE_HOST$|_SERVICE_PORT(_\w+)?$|_PORT(_\d+_(TCP|UDP|SCTP)(_\w+)?)?$"
)

# Keys whose value may be zero; every other number must be positive.
_ZERO_ALLOWED = {
    "server.port",
    "server.drain_delay",
    "server.max_body_size",
    "upstream.replay_body_limit",
    "auth.refresh_margin",
}


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section}_{key}".upper()


def _coerce(name: str, kind: Any, value: Any, *, from_text: bool) -> Any:
    """Turn a TOML value (or, from the environment, a string) into the key's type."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in ("true", "1"):
                return True
            if lowered in ("false", "0"):
                return False
        raise ConfigError(f"{name}: expected true or false, got {_shown(name, value)}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        hint = ""
        if isinstance(value, str) and value.startswith("tcp://"):
            hint = (
                " (a Kubernetes Service named after this variable injects it; "
                "set enableServiceLinks: false in the pod spec)"
            )
        raise ConfigError(f"{name}: expected a whole number, got {_shown(name, value)}{hint}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif from_text and isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise ConfigError(
                    f"{name}: expected a number of seconds, got {_shown(name, value)}"
                ) from None
        else:
            raise ConfigError(f"{name}: expected a number of seconds, got {_shown(name, value)}")
        if not math.isfinite(number):
            raise ConfigError(f"{name}: expected a finite number, got {_shown(name, value)}")
        return number
    if isinstance(value, str):
        return Secret(value) if kind is Secret else value
    raise ConfigError(f"{name}: expected a string, got {_shown(name, value)}")


def _shown(name: str, value: Any) -> str:
    """How a bad value is quoted in an error: never a secret's text."""
    if name.lower().endswith("secret"):
        return f"a {type(value).__name__}"
    return repr(value)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc})") from None


def load(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build validated settings: defaults < the TOML file < ``environ`` < ``overrides``.

    ``path`` defaults to ``$SPARKS_PROXY_CONFIG``, else ``./config.toml``; the default file may
    be absent (a container configured only through the environment), a named one may not.
    ``overrides`` maps dotted keys (``"server.port"``) to already-typed values from CLI flags.
    """
    environ = os.environ if environ is None else environ
    explicit = path or environ.get(CONFIG_ENV)
    file_path = Path(explicit or DEFAULT_CONFIG_PATH)
    document: dict[str, Any] = {}
    if explicit or file_path.exists():
        document = _read_file(file_path)

    for section in document:
        if section not in SECTIONS:
            raise ConfigError(
                f"config file {file_path}: unknown section [{section}]; "
                f"expected one of {', '.join('[' + s + ']' for s in SECTIONS)}"
            )

    values: dict[str, dict[str, Any]] = {}
    for section, cls in SECTIONS.items():
        types = _field_types(cls)
        chosen: dict[str, Any] = {}
        table = document.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"config file {file_path}: [{section}] must be a table")
        for key, raw in table.items():
            if key not in types:
                raise ConfigError(
                    f"{section}.{key}: unknown key in [{section}]; "
                    f"expected one of {', '.join(types)}"
                )
            chosen[key] = _coerce(f"{section}.{key}", types[key], raw, from_text=False)
        for key, kind in types.items():
            env_value = environ.get(_env_name(section, key))
            if env_value is not None:
                chosen[key] = _coerce(_env_name(section, key), kind, env_value, from_text=True)
        values[section] = chosen

    # Environment names in a known section must be known keys: a typo should not pass silently.
    # Other SPARKS_PROXY_* names, and Kubernetes service links (a Service named
    # "sparks-proxy-auth" injects SPARKS_PROXY_AUTH_SERVICE_HOST), are left alone.
    for name in environ:
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("_")
        if section not in SECTIONS or _SERVICE_LINK.search(name):
            continue
        if name != name.upper():
            raise ConfigError(f"{name}: environment names are upper case, e.g. {name.upper()}")
        if key not in _field_types(SECTIONS[section]):
            raise ConfigError(
                f"{name}: unknown setting; expected {ENV_PREFIX}{section.upper()}_<KEY> with "
                f"KEY one of {', '.join(k.upper() for k in _field_types(SECTIONS[section]))}"
            )

    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        values[section][key] = value

    settings = Settings(**{name: SECTIONS[name](**vals) for name, vals in values.items()})
    return validate(settings)


def validate(settings: Settings) -> Settings:
    """Check cross-field rules and normalise URLs; return the settings to use."""
    for section, cls in SECTIONS.items():
        part = getattr(settings, section)
        for key, kind in _field_types(cls).items():
            name = f"{section}.{key}"
            value = getattr(part, key)
            if kind in (int, float) and name not in _ZERO_ALLOWED and value <= 0:
                raise ConfigError(f"{name}: expected a positive number, got {value!r}")
            if kind in (int, float) and value < 0:
                raise ConfigError(f"{name}: expected zero or more, got {value!r}")
            if name in CHOICES and value.lower() not in CHOICES[name]:
                raise ConfigError(
                    f"{name}: expected one of {', '.join(CHOICES[name])}, got {value!r}"
                )
    if settings.server.port > 65535:
        raise ConfigError(f"server.port: expected 0 to 65535, got {settings.server.port}")

    upstream_url = _check_url("upstream.url", settings.upstream.url, allow_path=True)
    _check_url("auth.token_url", settings.auth.token_url, allow_path=True)
    if ca_file := settings.upstream.ca_file:
        if not _readable(ca_file):
            raise ConfigError(
                f"upstream.ca_file: cannot read {ca_file!r}; expected a readable file"
            )
        try:  # this file alone, not the system's CA store as well
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=ca_file)
        except (ssl.SSLError, ValueError):
            raise ConfigError(
                f"upstream.ca_file: {ca_file!r} holds no CA certificate; expected PEM"
                " (-----BEGIN CERTIFICATE-----)"
            ) from None
    for name, file in (
        ("auth.client_secret_file", settings.auth.client_secret_file),
        ("auth.redis_url_file", settings.auth.redis_url_file),
        ("auth.redis_encryption_key_file", settings.auth.redis_encryption_key_file),
    ):
        if file and not _readable(file):
            # Not quoted: the value set here by mistake is often the secret itself.
            raise ConfigError(
                f"{name}: not a readable file (the value is not shown: it may be a secret);"
                " expected the path of a file holding it"
            )
    if settings.auth.client_secret_file:
        try:
            secret = read_secret_file(settings.auth.client_secret_file)
        except (OSError, UnicodeDecodeError):
            raise ConfigError(
                "auth.client_secret_file: cannot be read as UTF-8 text; expected the client "
                "secret in it"
            ) from None
        if not secret:
            raise ConfigError(
                "auth.client_secret_file: the file is empty; expected the client secret in it"
            )
    if settings.auth.client_secret and settings.auth.client_secret_file:
        raise ConfigError(
            "auth.client_secret and auth.client_secret_file are both set; expected only one"
        )
    if settings.auth.token_cache_file:
        cache_file = Path(settings.auth.token_cache_file)
        if not os.access(cache_file.parent, os.W_OK):
            raise ConfigError(
                f"auth.token_cache_file: directory {str(cache_file.parent)!r} is not writable"
            )
        if cache_file.exists() and not cache_file.is_file():
            raise ConfigError(
                f"auth.token_cache_file: {str(cache_file)!r} is not a regular file; expected "
                "the path of a file the proxy may create and replace"
            )
    settings = _lower_choices(
        dataclasses.replace(
            settings, upstream=dataclasses.replace(settings.upstream, url=upstream_url)
        )
    )
    return _check_token_cache(settings)


def _check_token_cache(settings: Settings) -> Settings:
    """token_cache and its companions agree; a cache file alone means the file cache."""
    auth = settings.auth
    if auth.token_cache == "memory" and auth.token_cache_file:
        return dataclasses.replace(settings, auth=dataclasses.replace(auth, token_cache="file"))
    if auth.token_cache == "file" and not auth.token_cache_file:
        raise ConfigError('auth.token_cache = "file" needs auth.token_cache_file')
    if auth.token_cache == "redis":
        if bool(auth.redis_url) == bool(auth.redis_url_file):
            raise ConfigError(
                'auth.token_cache = "redis" needs exactly one of auth.redis_url and '
                "auth.redis_url_file"
            )
        if auth.redis_encryption_key_file:
            read_encryption_key(auth.redis_encryption_key_file)
        try:
            url = redis_url(auth)
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a port that is not one
        except (UnicodeDecodeError, ValueError):
            parts = None
        if parts is None or parts.scheme not in ("redis", "rediss", "unix"):
            # The URL may hold a password: name the key, never echo the value.
            raise ConfigError(
                "auth.redis_url: expected a URL such as redis://[:password@]host:port/db "
                "(rediss:// and unix:// work too)"
            )
    return settings


def _lower_choices(settings: Settings) -> Settings:
    """Choices are case-insensitive (``INFO`` works); the code compares lower case."""
    for name in CHOICES:
        section, _, key = name.partition(".")
        part = getattr(settings, section)
        lowered = getattr(part, key).lower()
        settings = dataclasses.replace(
            settings, **{section: dataclasses.replace(part, **{key: lowered})}
        )
    return settings


def read_encryption_key(path: str) -> bytes:
    """The AES key in ``path`` (base64 of 16, 24 or 32 bytes), or a ConfigError."""
    try:
        key = base64.b64decode(Path(path).read_text(encoding="ascii").strip(), validate=True)
    except (OSError, ValueError):
        key = b""
    if len(key) not in (16, 24, 32):
        raise ConfigError(
            "auth.redis_encryption_key_file: expected the base64 of a 16, 24 or 32-byte key "
            "(make one with: head -c 32 /dev/urandom | base64)"
        )
    return key


def require_credentials(settings: Settings) -> None:
    """Raise unless a client id and a secret are configured (``serve``, ``check``, ``token``)."""
    if not settings.auth.client_id:
        raise ConfigError(
            "auth.client_id: required; set it in [auth] or SPARKS_PROXY_AUTH_CLIENT_ID "
            "(or run `sparks-proxy demo` to try the proxy without credentials)"
        )
    if not (settings.auth.client_secret or settings.auth.client_secret_file):
        raise ConfigError(
            "auth.client_secret: required; set auth.client_secret_file (preferred), "
            "auth.client_secret or SPARKS_PROXY_AUTH_CLIENT_SECRET"
        )


def _readable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.R_OK)


def redis_url(auth: AuthSettings) -> str:
    """``auth.redis_url``, or the URL in ``auth.redis_url_file`` without surrounding whitespace.

    Raises OSError or UnicodeDecodeError when the file cannot be read as UTF-8.
    """
    return auth.redis_url or Path(auth.redis_url_file).read_text(encoding="utf-8").strip()


def read_secret_file(path: str) -> str:
    """A secret file's text without surrounding whitespace or a byte-order mark.

    Raises OSError or UnicodeDecodeError when it cannot be read as UTF-8.
    """
    return Path(path).read_text(encoding="utf-8-sig").strip()


def _check_url(name: str, url: str, *, allow_path: bool) -> str:
    """Validate an http(s) URL; return it without a trailing slash."""
    parts = urlsplit(url)
    # A URL shown in an error loses anything before an "@": a password, however mistyped.
    shown = repr("...@" + url.rpartition("@")[2] if "@" in url else url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}: expected an http:// or https:// URL, got {shown}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"{name}: expected a URL without query, fragment or userinfo")
    if parts.path not in ("", "/") and not allow_path:
        raise ConfigError(f"{name}: expected a URL without a path, got {shown}")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        # The token (or the secret) would cross the network in the clear.
        raise ConfigError(
            f"{name}: plain http is allowed only for loopback hosts; expected https://, got {shown}"
        )
    return url.rstrip("/")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
