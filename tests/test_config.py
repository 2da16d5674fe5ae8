"""proxy.config.load: defaults < TOML file < environment < overrides, and what it refuses.

Every test passes ``environ=`` explicitly (``os.environ`` is never read or patched) and runs in
an empty temporary working directory, so no stray ``./config.toml`` is picked up.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from proxy.config import SECTIONS, Secret, Settings, load, require_credentials
from proxy.errors import ConfigError

# Obvious fakes, distinctive enough that finding them in a message can only mean a leak.
SECRET = "demo-secret-do-not-print"
OTHER_SECRET = "demo-secret-other-value"


@pytest.fixture(autouse=True)
def _empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in its own empty directory: the implicit ./config.toml is absent."""
    monkeypatch.chdir(tmp_path)


def write_toml(directory: Path, text: str, name: str = "settings.toml") -> str:
    """Write ``text`` (dedented) as a TOML file in ``directory``; return its path."""
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def load_error(
    path: str | None = None,
    environ: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> str:
    """The message of the ConfigError that ``load`` must raise for these inputs."""
    with pytest.raises(ConfigError) as excinfo:
        load(path, environ if environ is not None else {}, overrides)
    return str(excinfo.value)


# -- defaults and where the file comes from ----------------------------------------------------


def test_defaults_without_file_or_environment() -> None:
    """No file and an empty environment give exactly the documented defaults."""
    settings = load(None, {})
    assert settings == Settings()
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 8080
    assert settings.upstream.url == "https://api.logicdrop.io"
    assert settings.upstream.read_timeout == 60.0
    assert settings.auth.token_url == "https://auth.logicdrop.io/oauth/token"
    assert settings.auth.client_id == ""
    assert not settings.auth.client_secret
    assert settings.log.level == "info"
    assert settings.log.access is True
    assert not settings.has_credentials


def test_implicit_config_toml_in_working_directory_is_read(tmp_path: Path) -> None:
    """With no path and no SPARKS_PROXY_CONFIG, ./config.toml is loaded when it exists."""
    write_toml(tmp_path, "[server]\nport = 9001\n", name="config.toml")
    assert load(None, {}).server.port == 9001


def test_config_env_variable_selects_the_file(tmp_path: Path) -> None:
    """SPARKS_PROXY_CONFIG names the file to load, in preference to ./config.toml."""
    write_toml(tmp_path, "[server]\nport = 9001\n", name="config.toml")
    chosen = write_toml(tmp_path, "[server]\nport = 9100\n", name="chosen.toml")
    assert load(None, {"SPARKS_PROXY_CONFIG": chosen}).server.port == 9100


def test_explicit_path_wins_over_config_env_variable(tmp_path: Path) -> None:
    """A path passed to load() (the --config flag) is used instead of SPARKS_PROXY_CONFIG."""
    by_env = write_toml(tmp_path, "[server]\nport = 9100\n", name="by-env.toml")
    by_flag = write_toml(tmp_path, "[server]\nport = 9200\n", name="by-flag.toml")
    assert load(by_flag, {"SPARKS_PROXY_CONFIG": by_env}).server.port == 9200


def test_explicit_missing_path_is_an_error(tmp_path: Path) -> None:
    """A named config file that does not exist is refused, and the message names it."""
    missing = str(tmp_path / "nowhere.toml")
    message = load_error(missing)
    assert "nowhere.toml" in message
    assert "cannot read" in message


def test_missing_file_named_by_config_env_variable_is_an_error(tmp_path: Path) -> None:
    """A file named by SPARKS_PROXY_CONFIG must exist: only the implicit one may be absent."""
    message = load_error(None, {"SPARKS_PROXY_CONFIG": str(tmp_path / "gone.toml")})
    assert "gone.toml" in message


def test_invalid_toml_is_an_error_naming_the_file(tmp_path: Path) -> None:
    """A file that is not TOML is refused with a message naming the file."""
    path = write_toml(tmp_path, "[server\nport = 1\n", name="broken.toml")
    message = load_error(path)
    assert "broken.toml" in message
    assert "not valid TOML" in message


# -- precedence --------------------------------------------------------------------------------

PRECEDENCE_CASES = [
    # (dotted key, env variable, TOML literal, its value, env text, its value, override)
    ("server.port", "SPARKS_PROXY_SERVER_PORT", "9001", 9001, "9002", 9002, 9003),
    (
        "upstream.read_timeout",
        "SPARKS_PROXY_UPSTREAM_READ_TIMEOUT",
        "11.5",
        11.5,
        "12.5",
        12.5,
        13.5,
    ),
    ("log.access", "SPARKS_PROXY_LOG_ACCESS", "false", False, "1", True, False),
    (
        "auth.client_id",
        "SPARKS_PROXY_AUTH_CLIENT_ID",
        '"demo-client-file"',
        "demo-client-file",
        "demo-client-env",
        "demo-client-env",
        "demo-client-flag",
    ),
    (
        "auth.client_secret",
        "SPARKS_PROXY_AUTH_CLIENT_SECRET",
        '"demo-secret-file"',
        Secret("demo-secret-file"),
        "demo-secret-env",
        Secret("demo-secret-env"),
        Secret("demo-secret-flag"),
    ),
]


@pytest.mark.parametrize(
    ("dotted", "env_name", "toml_literal", "file_value", "env_text", "env_value", "override"),
    PRECEDENCE_CASES,
    ids=[case[0] for case in PRECEDENCE_CASES],
)
def test_precedence_file_then_environment_then_overrides(
    tmp_path: Path,
    dotted: str,
    env_name: str,
    toml_literal: str,
    file_value: Any,
    env_text: str,
    env_value: Any,
    override: Any,
) -> None:
    """The file beats the default, the environment beats the file, overrides beat both."""
    section, key = dotted.split(".")
    path = write_toml(tmp_path, f"[{section}]\n{key} = {toml_literal}\n")

    def value(settings: Settings) -> Any:
        return getattr(getattr(settings, section), key)

    assert value(Settings()) != file_value  # the file really changes something
    assert value(load(path, {})) == file_value
    assert value(load(path, {env_name: env_text})) == env_value
    assert value(load(path, {env_name: env_text}, {dotted: override})) == override


def test_none_override_leaves_lower_layers_alone() -> None:
    """An override of None (a flag not given) keeps the value from the environment."""
    settings = load(None, {"SPARKS_PROXY_SERVER_PORT": "9002"}, {"server.port": None})
    assert settings.server.port == 9002


# -- environment parsing -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "section", "key", "expected"),
    [
        # Each value differs from the key's default, so an ignored variable fails the test.
        ("SPARKS_PROXY_UPSTREAM_TRUST_ENV", "true", "upstream", "trust_env", True),
        ("SPARKS_PROXY_UPSTREAM_TRUST_ENV", "1", "upstream", "trust_env", True),
        ("SPARKS_PROXY_UPSTREAM_TRUST_ENV", "TRUE", "upstream", "trust_env", True),
        ("SPARKS_PROXY_LOG_ACCESS", "false", "log", "access", False),
        ("SPARKS_PROXY_LOG_ACCESS", "0", "log", "access", False),
        ("SPARKS_PROXY_LOG_ACCESS", "False", "log", "access", False),
    ],
)
def test_environment_booleans(name: str, text: str, section: str, key: str, expected: bool) -> None:
    """Booleans from the environment accept true/false/1/0, case-insensitively."""
    value = getattr(getattr(load(None, {name: text}), section), key)
    assert value is expected


@pytest.mark.parametrize("text", ["yes", "no", "2", "", "enabled"])
def test_environment_bad_boolean_names_the_variable(text: str) -> None:
    """A boolean variable with any other value is refused, naming the variable."""
    message = load_error(None, {"SPARKS_PROXY_LOG_ACCESS": text})
    assert "SPARKS_PROXY_LOG_ACCESS" in message
    assert "true or false" in message


def test_environment_integer() -> None:
    """Integer keys parse decimal text from the environment."""
    settings = load(None, {"SPARKS_PROXY_SERVER_PORT": "9001"})
    assert settings.server.port == 9001
    assert isinstance(settings.server.port, int)


@pytest.mark.parametrize("text", ["eighty", "80.5", "", "0x50"])
def test_environment_bad_integer_names_the_variable(text: str) -> None:
    """Text that is not a whole number is refused for an integer key, naming the variable."""
    message = load_error(None, {"SPARKS_PROXY_SERVER_PORT": text})
    assert "SPARKS_PROXY_SERVER_PORT" in message
    assert "whole number" in message


@pytest.mark.parametrize(("text", "expected"), [("2.5", 2.5), ("3", 3.0), (" 0.25 ", 0.25)])
def test_environment_float(text: str, expected: float) -> None:
    """Float keys parse decimal text (with or without a fraction) from the environment."""
    value = load(None, {"SPARKS_PROXY_UPSTREAM_READ_TIMEOUT": text}).upstream.read_timeout
    assert value == expected
    assert isinstance(value, float)


@pytest.mark.parametrize("text", ["soon", "", "nan", "inf", "-inf"])
def test_environment_bad_float_names_the_variable(text: str) -> None:
    """Non-numbers and non-finite numbers are refused for a float key, naming the variable."""
    message = load_error(None, {"SPARKS_PROXY_UPSTREAM_READ_TIMEOUT": text})
    assert "SPARKS_PROXY_UPSTREAM_READ_TIMEOUT" in message


# -- unknown names -----------------------------------------------------------------------------


def test_unknown_section_in_file(tmp_path: Path) -> None:
    """A section that does not exist is refused; the message names it and the real ones."""
    path = write_toml(tmp_path, "[sever]\nport = 9001\n")
    message = load_error(path)
    assert "[sever]" in message
    assert "[server]" in message


def test_unknown_key_in_file(tmp_path: Path) -> None:
    """A misspelt key in a known section is refused, naming the key but not its value."""
    path = write_toml(tmp_path, f'[auth]\nclient_secrt = "{SECRET}"\n')
    message = load_error(path)
    assert "auth.client_secrt" in message
    assert "client_secret" in message  # the list of real keys
    assert SECRET not in message


def test_unknown_key_in_environment_for_known_section() -> None:
    """A misspelt SPARKS_PROXY_<SECTION>_<KEY> is refused, naming the variable, not its value."""
    message = load_error(None, {"SPARKS_PROXY_AUTH_CLIENT_SECRT": SECRET})
    assert "SPARKS_PROXY_AUTH_CLIENT_SECRT" in message
    assert SECRET not in message


def test_unrelated_sparks_proxy_variables_are_ignored() -> None:
    """Kubernetes service links (SPARKS_PROXY_PORT, SPARKS_PROXY_SERVICE_*) are not settings."""
    environ = {
        "SPARKS_PROXY_PORT": "tcp://10.0.0.1:8080",
        "SPARKS_PROXY_PORT_8080_TCP": "tcp://10.0.0.1:8080",
        "SPARKS_PROXY_PORT_8080_TCP_ADDR": "10.0.0.1",
        "SPARKS_PROXY_SERVICE_HOST": "10.0.0.1",
        "SPARKS_PROXY_SERVICE_PORT": "8080",
        "SPARKS_PROXY_SERVER_PORT": "9001",
    }
    settings = load(None, environ)
    assert settings.server.port == 9001
    assert settings.server.host == "127.0.0.1"


def test_service_links_of_services_named_after_a_section_are_ignored() -> None:
    """A Service named ``sparks-proxy-auth`` injects SPARKS_PROXY_AUTH_*: not a typo to refuse."""
    environ = {
        "SPARKS_PROXY_AUTH_PORT": "tcp://10.0.0.2:80",
        "SPARKS_PROXY_AUTH_PORT_80_TCP_ADDR": "10.0.0.2",
        "SPARKS_PROXY_AUTH_SERVICE_HOST": "10.0.0.2",
        "SPARKS_PROXY_AUTH_SERVICE_PORT_HTTP": "80",
        "SPARKS_PROXY_AUTH_CLIENT_ID": "demo-client",
    }
    assert load(None, environ).auth.client_id == "demo-client"


def test_mixed_case_environment_names_are_refused() -> None:
    """``SPARKS_PROXY_AUTH_client_id`` would be silently ignored; it is an error instead."""
    with pytest.raises(ConfigError, match="SPARKS_PROXY_AUTH_CLIENT_ID"):
        load(None, {"SPARKS_PROXY_AUTH_client_id": "demo-client"})


# -- types in the file -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ('[server]\nport = "eighty"\n', "server.port", "whole number"),
        ("[server]\nport = 80.5\n", "server.port", "whole number"),
        ("[server]\nport = true\n", "server.port", "whole number"),
        ('[log]\naccess = "yes"\n', "log.access", "true or false"),
        ("[log]\naccess = 1\n", "log.access", "true or false"),
        ('[upstream]\nread_timeout = "soon"\n', "upstream.read_timeout", "number"),
        ("[upstream]\nread_timeout = false\n", "upstream.read_timeout", "number"),
        ("[auth]\nclient_id = 42\n", "auth.client_id", "string"),
        ('[upstream]\nurl = ["https://api.example.test"]\n', "upstream.url", "string"),
    ],
)
def test_wrong_type_in_file_names_key_and_expected_type(
    tmp_path: Path, text: str, key: str, expected: str
) -> None:
    """A TOML value of the wrong type is refused, naming the key and the type expected."""
    message = load_error(write_toml(tmp_path, text))
    assert key in message
    assert expected in message


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    """A section name used as a plain key (auth = 3) is refused, naming the section."""
    message = load_error(write_toml(tmp_path, "auth = 3\n"))
    assert "[auth]" in message


# -- choices -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "allowed"),
    [
        ("auth", "request_format", ("json", "form")),
        ("auth", "client_auth", ("post", "basic")),
        ("log", "level", ("debug", "info", "warning", "error")),
        ("log", "format", ("json", "text")),
    ],
)
def test_choices_reject_other_values_listing_the_allowed_ones(
    tmp_path: Path, section: str, key: str, allowed: tuple[str, ...]
) -> None:
    """A value outside a key's choices is refused; the message lists every allowed value."""
    message = load_error(write_toml(tmp_path, f'[{section}]\n{key} = "bogus"\n'))
    assert f"{section}.{key}" in message
    assert "'bogus'" in message
    for choice in allowed:
        assert choice in message


def test_choices_accept_their_non_default_values(tmp_path: Path) -> None:
    """Each choice key accepts a documented value other than its default."""
    path = write_toml(
        tmp_path,
        """
        [auth]
        request_format = "form"
        client_auth = "basic"
        [log]
        level = "debug"
        format = "json"
        """,
    )
    settings = load(path, {})
    assert (settings.auth.request_format, settings.auth.client_auth) == ("form", "basic")
    assert (settings.log.level, settings.log.format) == ("debug", "json")


def test_choice_from_environment_is_checked() -> None:
    """Choices set through the environment are validated like those from the file."""
    message = load_error(None, {"SPARKS_PROXY_LOG_LEVEL": "verbose"})
    assert "log.level" in message
    assert "debug" in message


# -- URLs --------------------------------------------------------------------------------------

URL_KEYS = [
    ("upstream", "url", "SPARKS_PROXY_UPSTREAM_URL"),
    ("auth", "token_url", "SPARKS_PROXY_AUTH_TOKEN_URL"),
]


@pytest.mark.parametrize(("section", "key", "env_name"), URL_KEYS, ids=["upstream", "token"])
@pytest.mark.parametrize(
    "url",
    [
        "not a url",
        "api.example.test",
        "ftp://files.example.test/sparks",
        "https://",
        "https://api.example.test/v1?tenant=acme",
        "https://api.example.test/v1#top",
        "https://demo-client:demo-secret@api.example.test/",
        "http://api.example.test",
        "http://10.0.0.5:8080",
        "http://localhost.example.test:8080",
    ],
)
def test_bad_urls_are_rejected(section: str, key: str, env_name: str, url: str) -> None:
    """Non-URLs, other schemes, queries/fragments/userinfo and http to non-loopback are refused."""
    message = load_error(None, {env_name: url})
    assert f"{section}.{key}" in message


@pytest.mark.parametrize(("section", "key", "env_name"), URL_KEYS, ids=["upstream", "token"])
@pytest.mark.parametrize(
    "url",
    [
        "https//demo-client:demo-secret@api.example.test/",  # a scheme mistyped
        "http://demo-client:demo-secret@api.example.test/",  # plain http besides
        "demo-secret@api.example.test",
    ],
)
def test_a_bad_url_is_shown_without_what_precedes_an_at(
    section: str, key: str, env_name: str, url: str
) -> None:
    """A URL in an error loses any userinfo, however mistyped the rest: never the password."""
    message = load_error(None, {env_name: url})
    assert f"{section}.{key}" in message
    assert "demo-secret" not in message


@pytest.mark.parametrize(
    ("key", "env_name"),
    [
        ("auth.client_secret_file", "SPARKS_PROXY_AUTH_CLIENT_SECRET_FILE"),
        ("auth.redis_url_file", "SPARKS_PROXY_AUTH_REDIS_URL_FILE"),
        ("auth.redis_encryption_key_file", "SPARKS_PROXY_AUTH_REDIS_ENCRYPTION_KEY_FILE"),
    ],
)
def test_a_secret_set_where_its_file_belongs_is_not_echoed(key: str, env_name: str) -> None:
    """The usual slip, the secret itself in a *_FILE variable, names the key, never the value."""
    message = load_error(None, {env_name: "demo-secret"})
    assert key in message
    assert "demo-secret" not in message


@pytest.mark.parametrize(("section", "key", "env_name"), URL_KEYS, ids=["upstream", "token"])
@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9000", "http://localhost:9000", "https://api.example.test"]
)
def test_loopback_http_and_any_https_are_accepted(
    section: str, key: str, env_name: str, url: str
) -> None:
    """Plain http is fine to a loopback host (127.0.0.1, localhost); https to any host."""
    settings = load(None, {env_name: url})
    assert getattr(getattr(settings, section), key).startswith(url)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:9000/", "http://127.0.0.1:9000"),
        ("https://api.example.test/sparks/v2/", "https://api.example.test/sparks/v2"),
        ("https://api.example.test/sparks/v2", "https://api.example.test/sparks/v2"),
    ],
)
def test_upstream_url_loses_trailing_slash_and_keeps_base_path(url: str, expected: str) -> None:
    """upstream.url is stored without a trailing slash; a base path is kept."""
    assert load(None, {"SPARKS_PROXY_UPSTREAM_URL": url}).upstream.url == expected


# -- the secret --------------------------------------------------------------------------------


def test_inline_secret_and_secret_file_together_are_refused(tmp_path: Path) -> None:
    """auth.client_secret and auth.client_secret_file are exclusive; the secret is not shown."""
    secret_file = tmp_path / "client_secret"
    secret_file.write_text(OTHER_SECRET, encoding="utf-8")
    path = write_toml(
        tmp_path,
        f"""
        [auth]
        client_id = "demo-client"
        client_secret = "{SECRET}"
        client_secret_file = "{secret_file}"
        """,
    )
    message = load_error(path)
    assert "auth.client_secret" in message
    assert "auth.client_secret_file" in message
    assert SECRET not in message
    assert OTHER_SECRET not in message


def test_missing_secret_file_names_the_key(tmp_path: Path) -> None:
    """A client_secret_file that cannot be read is refused, naming auth.client_secret_file."""
    missing = tmp_path / "secrets" / "client_secret"
    message = load_error(None, {"SPARKS_PROXY_AUTH_CLIENT_SECRET_FILE": str(missing)})
    assert "auth.client_secret_file" in message


def test_secret_file_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    """A client_secret_file naming a directory (e.g. a mounted Secret volume) is refused.

    The message promises "a readable file"; a directory passes os.access(R_OK) but cannot be
    read as the secret, so it must fail at load time (exit 2), not at the first token request.
    """
    volume = tmp_path / "secret-volume"
    volume.mkdir()
    message = load_error(None, {"SPARKS_PROXY_AUTH_CLIENT_SECRET_FILE": str(volume)})
    assert "auth.client_secret_file" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "the file is empty"),
        (b" \n\t\n", "the file is empty"),
        (b"\xef\xbb\xbf\n", "the file is empty"),  # a byte-order mark alone
        (b"\xff\xfe secret", "cannot be read as UTF-8"),
    ],
    ids=["empty", "whitespace", "bom-only", "not-utf-8"],
)
def test_a_secret_file_without_a_secret_is_refused(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    """A secret file that holds no secret is a configuration error, not a token request with
    an empty secret that the issuer refuses for reasons of its own."""
    secret_file = tmp_path / "client-secret"
    secret_file.write_bytes(content)
    message = load_error(None, {"SPARKS_PROXY_AUTH_CLIENT_SECRET_FILE": str(secret_file)})
    assert message.startswith("auth.client_secret_file: ")
    assert expected in message


def test_a_ca_file_that_is_not_pem_is_refused(tmp_path: Path) -> None:
    """upstream.ca_file must hold PEM certificates: found at load, not as a traceback later."""
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("not a certificate\n", encoding="utf-8")
    message = load_error(None, {"SPARKS_PROXY_UPSTREAM_CA_FILE": str(ca_file)})
    assert message.startswith("upstream.ca_file: ")
    assert "PEM" in message


@pytest.mark.parametrize(
    "url",
    [
        "redis://:demo-secret@127.0.0.1:notaport/0",
        "redis://:demo-secret@127.0.0.1:99999/0",
        "http://:demo-secret@127.0.0.1:6379/0",
    ],
)
def test_a_malformed_redis_url_is_refused_without_its_password(url: str) -> None:
    """A Redis URL that is not one names the key and shows nothing of the value."""
    message = load_error(
        None, {"SPARKS_PROXY_AUTH_TOKEN_CACHE": "redis", "SPARKS_PROXY_AUTH_REDIS_URL": url}
    )
    assert message.startswith("auth.redis_url: ")
    assert "demo-secret" not in message


def test_a_token_cache_file_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    """A directory where the token cache file goes would silently stop the sharing."""
    message = load_error(None, {"SPARKS_PROXY_AUTH_TOKEN_CACHE_FILE": str(tmp_path)})
    assert message.startswith("auth.token_cache_file: ")
    assert "not a regular file" in message


def test_readable_secret_file_counts_as_credentials(tmp_path: Path) -> None:
    """client_id plus a readable client_secret_file are credentials; the file is not inlined."""
    secret_file = tmp_path / "client_secret"
    secret_file.write_text(SECRET, encoding="utf-8")
    settings = load(
        None,
        {
            "SPARKS_PROXY_AUTH_CLIENT_ID": "demo-client",
            "SPARKS_PROXY_AUTH_CLIENT_SECRET_FILE": str(secret_file),
        },
    )
    assert settings.has_credentials
    assert settings.auth.client_secret_file == str(secret_file)
    assert not settings.auth.client_secret
    require_credentials(settings)


def test_repr_of_settings_hides_the_secret(tmp_path: Path) -> None:
    """repr() and str() of the settings show <SECRET> where the secret is, never its text."""
    path = write_toml(tmp_path, f'[auth]\nclient_id = "demo-client"\nclient_secret = "{SECRET}"\n')
    settings = load(path, {})
    assert settings.auth.client_secret.reveal() == SECRET
    for text in (repr(settings), str(settings), repr(settings.auth)):
        assert "<SECRET>" in text
        assert SECRET not in text


@pytest.mark.parametrize(
    ("text", "environ"),
    [
        # The secret is set, and something else is wrong.
        (f'[auth]\nclient_secret = "{SECRET}"\nrequest_format = "xml"\n', {}),
        (f'[auth]\nclient_secret = "{SECRET}"\n', {"SPARKS_PROXY_SERVER_PORT": "eighty"}),
        (f'[auth]\nclient_secret = "{SECRET}"\ntoken_url = "http://auth.example.test/t"\n', {}),
        (f'[auth]\nclient_secret = "{SECRET}"\n[nope]\n', {}),
        ("[server]\nport = 9001\n", {"SPARKS_PROXY_AUTH_CLIENT_SECRT": SECRET}),
        # The secret itself is the bad value.
        ('[auth]\nclient_secret = ["demo-secret-do-not-print"]\n', {}),
        ("[auth]\nclient_secret = 123456789\n", {}),
    ],
    ids=[
        "bad-choice",
        "bad-env-port",
        "http-token-url",
        "unknown-section",
        "env-typo",
        "list",
        "int",
    ],
)
def test_secret_never_appears_in_config_errors(
    tmp_path: Path, text: str, environ: dict[str, str]
) -> None:
    """Whatever goes wrong, a ConfigError never quotes the secret's value."""
    path = write_toml(tmp_path, text)
    with pytest.raises(ConfigError) as excinfo:
        load(path, environ)
    message = f"{excinfo.value} {excinfo.value!r}"
    assert SECRET not in message
    assert "123456789" not in message


# -- credentials -------------------------------------------------------------------------------


def test_require_credentials_without_client_id_names_the_variable() -> None:
    """No client id: the error names auth.client_id and SPARKS_PROXY_AUTH_CLIENT_ID."""
    settings = load(None, {"SPARKS_PROXY_AUTH_CLIENT_SECRET": SECRET})
    with pytest.raises(ConfigError) as excinfo:
        require_credentials(settings)
    message = str(excinfo.value)
    assert "auth.client_id" in message
    assert "SPARKS_PROXY_AUTH_CLIENT_ID" in message
    assert SECRET not in message


def test_require_credentials_without_secret_names_the_variable() -> None:
    """No secret: the error names auth.client_secret and SPARKS_PROXY_AUTH_CLIENT_SECRET."""
    settings = load(None, {"SPARKS_PROXY_AUTH_CLIENT_ID": "demo-client"})
    with pytest.raises(ConfigError) as excinfo:
        require_credentials(settings)
    message = str(excinfo.value)
    assert "auth.client_secret" in message
    assert "SPARKS_PROXY_AUTH_CLIENT_SECRET" in message


def test_require_credentials_with_empty_secret_variable() -> None:
    """An empty SPARKS_PROXY_AUTH_CLIENT_SECRET is no secret at all."""
    settings = load(
        None,
        {"SPARKS_PROXY_AUTH_CLIENT_ID": "demo-client", "SPARKS_PROXY_AUTH_CLIENT_SECRET": ""},
    )
    with pytest.raises(ConfigError, match="SPARKS_PROXY_AUTH_CLIENT_SECRET"):
        require_credentials(settings)


def test_require_credentials_accepts_id_and_inline_secret() -> None:
    """A client id and an inline secret are enough: require_credentials does not raise."""
    settings = load(
        None,
        {"SPARKS_PROXY_AUTH_CLIENT_ID": "demo-client", "SPARKS_PROXY_AUTH_CLIENT_SECRET": SECRET},
    )
    assert settings.has_credentials
    require_credentials(settings)


# -- numbers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dotted",
    [
        "upstream.connect_timeout",
        "upstream.read_timeout",
        "upstream.pool_timeout",
        "auth.timeout",
        "auth.max_backoff",
        "server.shutdown_grace",
        "server.keepalive_timeout",
    ],
)
@pytest.mark.parametrize("value", ["0", "-1", "-0.5"])
def test_zero_or_negative_timeouts_are_refused(tmp_path: Path, dotted: str, value: str) -> None:
    """Every timeout must be positive; the message names the key."""
    section, key = dotted.split(".")
    message = load_error(write_toml(tmp_path, f"[{section}]\n{key} = {value}\n"))
    assert dotted in message
    assert "positive" in message


@pytest.mark.parametrize(
    ("source", "port"),
    [("file", 65536), ("file", 70000), ("env", 65536), ("override", 99999)],
)
def test_port_above_65535_is_refused(tmp_path: Path, source: str, port: int) -> None:
    """server.port above 65535 is refused wherever it comes from."""
    path, environ, overrides = None, {}, None
    if source == "file":
        path = write_toml(tmp_path, f"[server]\nport = {port}\n")
    elif source == "env":
        environ = {"SPARKS_PROXY_SERVER_PORT": str(port)}
    else:
        overrides = {"server.port": port}
    message = load_error(path, environ, overrides)
    assert "server.port" in message
    assert "65535" in message


def test_negative_port_is_refused() -> None:
    """A negative server.port is refused."""
    assert "server.port" in load_error(None, {"SPARKS_PROXY_SERVER_PORT": "-1"})


@pytest.mark.parametrize("port", [0, 1, 65535])
def test_port_bounds_are_accepted(port: int) -> None:
    """Ports 0 (any free port), 1 and 65535 are accepted."""
    assert load(None, {"SPARKS_PROXY_SERVER_PORT": str(port)}).server.port == port


def test_zero_is_allowed_where_documented(tmp_path: Path) -> None:
    """max_body_size 0 (no limit), replay_body_limit 0 (never replay), refresh_margin 0 (auto)."""
    path = write_toml(
        tmp_path,
        "[server]\nmax_body_size = 0\n[upstream]\nreplay_body_limit = 0\n"
        "[auth]\nrefresh_margin = 0\n",
    )
    settings = load(path, {})
    assert settings.server.max_body_size == 0
    assert settings.upstream.replay_body_limit == 0
    assert settings.auth.refresh_margin == 0.0


def test_choices_are_case_insensitive() -> None:
    """``SPARKS_PROXY_LOG_LEVEL=INFO`` works and is used as ``info``."""
    settings = load(
        None, {"SPARKS_PROXY_LOG_LEVEL": "INFO", "SPARKS_PROXY_AUTH_REQUEST_FORMAT": "Form"}
    )
    assert (settings.log.level, settings.auth.request_format) == ("info", "form")


def test_service_link_value_in_a_setting_explains_itself() -> None:
    """A Service named sparks-proxy-server collides with server.port: the error says so."""
    with pytest.raises(ConfigError, match="enableServiceLinks"):
        load(None, {"SPARKS_PROXY_SERVER_PORT": "tcp://10.0.0.1:8080"})


def test_example_config_documents_every_key_and_loads() -> None:
    """config.example.toml names every setting of every section, and is itself valid."""
    example = Path(__file__).parent.parent / "config.example.toml"
    text = example.read_text(encoding="utf-8")
    for section, cls in SECTIONS.items():
        # Each key stands as ``key = ...``, active or commented out (client_secret_file).
        table = text.split(f"\n[{section}]\n", 1)[1].split("\n[", 1)[0]
        for key in (f.name for f in dataclasses.fields(cls)):
            assert re.search(rf"^(# )?{key} = ", table, re.M), f"{section}.{key}"
    settings = load(str(example), {})
    defaults = Settings()
    assert settings.server == defaults.server
