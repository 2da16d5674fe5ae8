"""Token handling through real sockets: single flight, refresh, backoff, persistence, rotation."""

from __future__ import annotations

import asyncio
import base64
import fcntl
import json
import os
import stat
import time
from pathlib import Path

import aiohttp
import pytest

from proxy.app import TOKENS, client_session
from proxy.config import Secret
from proxy.errors import ERROR_HEADER, TokenError
from proxy.server import Proxy
from proxy.standins import DEMO_CLIENT_SECRET, StandInTokenServer, StandInUpstream
from proxy.token_endpoint import (
    MAX_LIFETIME,
    CredentialIdentity,
    Token,
    TokenEndpoint,
    _lifetime,
    _parse,
)
from proxy.token_store import FileTokenStore, decode, fingerprint
from proxy.tokens import TokenManager

from .rawhttp import RawUpstream, exchange
from .support import (
    LogCapture,
    ProxyFactory,
    assert_one_token_served,
    get_statuses,
    make_settings,
    wait_for,
    wait_ready,
)

GET = b"GET /projects HTTP/1.1\r\nHost: proxy.test\r\n\r\n"


async def test_first_token_is_fetched_at_start_up(
    start_proxy: ProxyFactory, token_server: StandInTokenServer, client: aiohttp.ClientSession
) -> None:
    """Readiness turns 200 without any traffic: the token is fetched when the proxy starts."""
    async with start_proxy() as proxy:
        await wait_for(lambda: len(token_server.issued) == 1)
        async with client.get(proxy.url + "/-/readyz") as response:
            assert response.status == 200
            assert (await response.json())["checks"]["token"]["ok"] is True


async def test_cold_burst_costs_exactly_one_token_request(
    start_proxy: ProxyFactory,
    token_server: StandInTokenServer,
    upstream: StandInUpstream,
) -> None:
    """200 concurrent requests on a cold cache share one token request, and all succeed."""
    token_server.delay = 0.3
    async with start_proxy() as proxy:
        statuses = await get_statuses(proxy.url + f"/burst/{i}" for i in range(200))
    assert statuses == [200] * 200
    assert_one_token_served(token_server, upstream)


async def test_refresh_happens_before_expiry_without_making_requests_wait(
    start_proxy: ProxyFactory,
    token_server: StandInTokenServer,
    upstream: StandInUpstream,
) -> None:
    """A new token is fetched ahead of expiry while requests go on with the current one: one
    token request per refresh, and no request waits for it."""
    token_server.expires_in = 3
    token_server.delay = 0.5  # the refresh is in flight this long
    async with start_proxy(auth={"refresh_margin": 1.5}) as proxy:
        await wait_ready(proxy)
        during_refresh = []  # the token upstream saw on each exchange made while refreshing
        after_refresh = 0  # exchanges made once the second token was issued
        async with asyncio.timeout(5):
            while after_refresh < 3:
                refreshing = len(token_server.requests) > len(token_server.issued)
                response = await exchange(proxy.port, GET)
                assert response.status == 200
                if refreshing and len(token_server.requests) > len(token_server.issued):
                    during_refresh.append(upstream.received[-1].header("Authorization")[0])
                after_refresh += len(token_server.issued) == 2
                await asyncio.sleep(0.02)
    # The first token (sent at about -0.5 s) expires at ~2.5 s: refreshed at ~0.85-1.0 s and
    # in hand at ~1.35-1.5 s; the second one's refresh would start after 2.2 s.
    assert len(token_server.issued) == 2
    assert during_refresh  # answered while the refresh was in flight, waiting for nothing,
    assert set(during_refresh) == {f"Bearer {token_server.issued[0]}"}  # with the held token
    used = [r.header("Authorization")[0] for r in upstream.received]
    assert used[0] == f"Bearer {token_server.issued[0]}"
    assert used[-1] == f"Bearer {token_server.issued[1]}"


async def test_failing_token_endpoint_backs_off_and_answers_503(
    start_proxy: ProxyFactory,
    token_server: StandInTokenServer,
    upstream: StandInUpstream,
    client: aiohttp.ClientSession,
) -> None:
    """No token: requests get 503 JSON with Retry-After, the endpoint is not hammered."""
    token_server.fail_always = "500"
    async with start_proxy() as proxy:
        await wait_for(lambda: len(token_server.requests) >= 1)
        answers = []
        for _ in range(30):
            async with client.get(proxy.url + "/x") as response:
                answers.append((response.status, response.headers.get("Retry-After")))
                body = await response.json()
            await asyncio.sleep(0.05)
        async with client.get(proxy.url + "/-/readyz") as ready:
            readiness = await ready.json()
            assert ready.status == 503
    assert {status for status, _ in answers} == {503}
    assert all(retry and int(retry) >= 1 for _, retry in answers)
    assert body["error"] == "token_unavailable"
    assert "500" in body["detail"]
    assert readiness["checks"]["token"]["error"] == "server_error"
    # 1.5 s of traffic: attempts at 0 s, then after backoffs of 0.5-1 s and 1-2 s.
    assert 1 <= len(token_server.requests) <= 3
    assert upstream.received == []


async def test_held_token_keeps_serving_while_the_endpoint_fails(
    start_proxy: ProxyFactory,
    token_server: StandInTokenServer,
    upstream: StandInUpstream,
) -> None:
    """Refresh failures do not touch requests while the held token is valid; never expired."""
    token_server.expires_in = 3
    async with start_proxy(auth={"refresh_margin": 1.5}) as proxy:
        await wait_ready(proxy)
        tokens = proxy.app[TOKENS]
        token = tokens.current()
        assert token is not None
        token_server.fail_always = "reset"
        statuses = []
        # Refresh is tried at 1.5-1.65 s before expiry; the last request here starts 0.5 s
        # before expiry, time enough on a busy machine to be served with the token.
        while token.remaining() > 0.5:
            statuses.append((await exchange(proxy.port, GET)).status)
            await asyncio.sleep(0.05)
        tried_before_expiry = len(token_server.requests)
        await wait_for(lambda: tokens.current() is None)
        after = await exchange(proxy.port, GET)
    assert set(statuses) == {200}
    assert tried_before_expiry >= 2  # the refresh was tried, and failed, while these were served
    assert after.status == 503
    assert after.header(ERROR_HEADER) == ["token_unavailable"]
    # Every forwarded request carried the one valid token.
    assert {r.header("Authorization")[0] for r in upstream.received} == {
        f"Bearer {token_server.issued[0]}"
    }


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        ("500", "server_error"),
        ("html", "bad_token_response"),
        ("empty", "bad_token_response"),
        ("no_token", "bad_token_response"),
        ("mac_token", "bad_token_response"),
        ("reset", "token_endpoint_unreachable"),
        ("redirect", "token_redirect"),
        ("invalid_client", "invalid_client"),
    ],
)
async def test_token_endpoint_failures_are_named(
    start_proxy: ProxyFactory,
    token_server: StandInTokenServer,
    client: aiohttp.ClientSession,
    failure: str,
    code: str,
) -> None:
    """Each kind of token endpoint failure shows up by name in readiness, without secrets."""
    token_server.fail_always = failure
    async with start_proxy() as proxy:
        await wait_for(lambda: len(token_server.requests) >= 1)
        await wait_for(lambda: proxy.app[TOKENS].last_error is not None)
        async with client.get(proxy.url + "/-/readyz") as response:
            text = await response.text()
        async with client.get(proxy.url + "/x") as forwarded:
            forwarded_text = await forwarded.text()
    assert json.loads(text)["checks"]["token"]["error"] == code
    assert DEMO_CLIENT_SECRET not in text + forwarded_text
    assert forwarded.status == 503


async def test_token_redirect_is_never_followed(
    start_proxy: ProxyFactory, token_server: StandInTokenServer
) -> None:
    """A 3xx from the token endpoint does not carry the secret anywhere else."""
    async with RawUpstream() as elsewhere:
        token_server.fail_always = "redirect"
        token_server.redirect_to = elsewhere.url + "/steal"
        async with start_proxy() as proxy:
            await wait_for(lambda: proxy.app[TOKENS].last_error is not None)
    assert elsewhere.connections == 0


async def test_invalid_client_is_not_hammered(
    start_proxy: ProxyFactory, token_server: StandInTokenServer, client: aiohttp.ClientSession
) -> None:
    """Bad credentials wait the full backoff cap; the error code reaches the client."""
    token_server.fail_always = "invalid_client"
    async with start_proxy(auth={"max_backoff": 30.0}) as proxy:
        await wait_for(lambda: proxy.app[TOKENS].last_error is not None)
        for _ in range(20):
            async with client.get(proxy.url + "/x") as response:
                body = await response.json()
                assert response.status == 503
                assert int(response.headers["Retry-After"]) > 20
    assert len(token_server.requests) == 1
    assert "invalid_client" in body["detail"]


@pytest.mark.parametrize(
    ("failure", "wait"),
    [("429", 2), ("429_reset", 1)],
    ids=["retry-after", "x-ratelimit-reset"],
)
async def test_429_wait_is_honoured(
    start_proxy: ProxyFactory, token_server: StandInTokenServer, failure: str, wait: int
) -> None:
    """After a 429, no attempt before the wait it asks for (Retry-After seconds, or
    Auth0's X-RateLimit-Reset epoch second)."""
    token_server.failures = [failure]
    token_server.retry_after = wait
    async with start_proxy() as proxy:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await wait_ready(proxy, timeout=5)
        waited = loop.time() - started
    assert len(token_server.requests) == 2
    assert waited >= wait


async def test_secret_file_is_reread_so_rotation_needs_no_restart(
    token_server: StandInTokenServer, upstream: StandInUpstream, tmp_path: os.PathLike[str]
) -> None:
    """A Kubernetes Secret rotated on disk is picked up at the next token request."""
    secret_file = os.path.join(tmp_path, "client-secret")
    with open(secret_file, "w") as fh:
        fh.write("old-demo-secret\n")
    settings = make_settings(
        token_server,
        upstream,
        auth={"client_secret": Secret(""), "client_secret_file": secret_file, "max_backoff": 1.0},
    )
    async with Proxy(settings) as proxy:
        await wait_for(lambda: proxy.app[TOKENS].last_error is not None)
        assert proxy.app[TOKENS].current() is None
        with open(secret_file, "w", encoding="utf-8") as fh:
            # A byte-order mark (Windows editors) and a trailing newline, as Secrets often have.
            fh.write("\ufeff" + DEMO_CLIENT_SECRET + "\n")
        await wait_ready(proxy, timeout=5)
    assert [r.fields.get("client_secret") for r in token_server.requests][-1] == DEMO_CLIENT_SECRET


async def test_a_secret_file_emptied_at_run_time_is_named(
    token_server: StandInTokenServer, upstream: StandInUpstream, tmp_path: Path
) -> None:
    """A secret file found empty at a fetch sends no request with an empty secret."""
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(DEMO_CLIENT_SECRET, encoding="utf-8")
    settings = make_settings(
        token_server,
        upstream,
        auth={"client_secret": Secret(""), "client_secret_file": str(secret_file)},
    )
    secret_file.write_text("  \n", encoding="utf-8")  # emptied after the settings were checked
    async with Proxy(settings) as proxy:
        await wait_for(lambda: proxy.app[TOKENS].last_error is not None)
        error = proxy.app[TOKENS].last_error
    assert error is not None
    assert (error.code, error.detail) == (
        "secret_unreadable",
        "auth.client_secret_file is empty; expected the client secret in it",
    )
    assert token_server.requests == []


async def test_token_cache_file_survives_a_restart(
    token_server: StandInTokenServer, upstream: StandInUpstream, tmp_path: os.PathLike[str]
) -> None:
    """A restart reuses the persisted token: no new token, file mode 0600, no secret in it."""
    cache = os.path.join(tmp_path, "tokens.json")
    settings = make_settings(token_server, upstream, auth={"token_cache_file": cache})
    async with Proxy(settings) as proxy:
        await wait_ready(proxy)
        await wait_for(lambda: os.path.exists(cache))
    async with Proxy(settings) as proxy:
        await wait_ready(proxy, timeout=5)  # a read, not a fetch: issued stays 1
        response = await exchange(proxy.port, GET)
    assert response.status == 200
    assert len(token_server.issued) == 1
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o600
    content = Path(cache).read_text()
    assert DEMO_CLIENT_SECRET not in content
    assert upstream.received[-1].header("Authorization") == [f"Bearer {token_server.issued[0]}"]


async def test_token_cache_file_is_keyed_by_credential(
    token_server: StandInTokenServer, upstream: StandInUpstream, tmp_path: os.PathLike[str]
) -> None:
    """A different audience does not reuse another credential's persisted token."""
    cache = os.path.join(tmp_path, "tokens.json")
    first = make_settings(token_server, upstream, auth={"token_cache_file": cache})
    second = make_settings(
        token_server, upstream, auth={"token_cache_file": cache, "audience": "https://other"}
    )
    async with Proxy(first) as proxy:
        await wait_ready(proxy)
        await wait_for(lambda: os.path.exists(cache))
    async with Proxy(second) as proxy:
        await wait_ready(proxy)
    assert len(token_server.issued) == 2
    assert len(json.loads(Path(cache).read_text())) == 2


@pytest.mark.parametrize(
    ("request_format", "client_auth"),
    [("json", "post"), ("form", "post"), ("json", "basic"), ("form", "basic")],
)
async def test_token_request_formats(
    start_proxy: ProxyFactory,
    token_server: StandInTokenServer,
    request_format: str,
    client_auth: str,
) -> None:
    """JSON (the vendor's docs) or form (RFC 6749) bodies; credentials in body or Basic."""
    async with start_proxy(
        auth={"request_format": request_format, "client_auth": client_auth, "scope": ""}
    ) as proxy:
        await wait_ready(proxy)
    seen = token_server.requests[0]
    expected_type = (
        "application/json" if request_format == "json" else ("application/x-www-form-urlencoded")
    )
    assert seen.content_type == expected_type
    assert seen.fields["grant_type"] == "client_credentials"
    assert seen.fields["audience"] == "https://api.logicdrop.io"
    assert "scope" not in seen.fields
    if client_auth == "basic":
        assert seen.basic == ("demo-client", DEMO_CLIENT_SECRET)
        assert "client_secret" not in seen.fields
    else:
        assert seen.basic is None
        assert seen.fields["client_id"] == "demo-client"
        assert seen.fields["client_secret"] == DEMO_CLIENT_SECRET


async def test_empty_audience_is_left_out(
    start_proxy: ProxyFactory, token_server: StandInTokenServer
) -> None:
    """``audience = ""`` omits the field instead of sending an empty one."""
    async with start_proxy(auth={"audience": ""}) as proxy:
        await wait_ready(proxy)
    assert "audience" not in token_server.requests[0].fields


async def test_scope_is_sent_when_configured(
    start_proxy: ProxyFactory, token_server: StandInTokenServer
) -> None:
    """A configured scope is part of the token request."""
    async with start_proxy(auth={"scope": "data core"}) as proxy:
        await wait_ready(proxy)
    assert token_server.requests[0].fields["scope"] == "data core"


def _jwt(exp: float) -> str:
    def part(doc: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none'})}.{part({'exp': exp})}.sig"


@pytest.mark.parametrize(
    ("expires_in", "token", "expected"),
    [
        (3600, "opaque", 3600),
        ("3600", "opaque", 3600),
        (None, "opaque", 3600),  # absent: the default
        (0, "opaque", 3600),  # zero and negative are treated as absent, not clamped up
        (-5, "opaque", 3600),
        (10**9, "opaque", 30 * 86400),  # absurdly long: clamped
        (0.5, "opaque", 2),  # absurdly short: clamped
        (None, "jwt+600", 600),  # absent: the JWT exp claim
    ],
)
def test_lifetime_rules(expires_in: object, token: str, expected: float) -> None:
    """expires_in, else the JWT exp claim, else 3600 s; clamped to [2 s, 30 days]."""
    value = _jwt(time.time() + 600) if token == "jwt+600" else token
    assert _lifetime(expires_in, value) == pytest.approx(expected, abs=2)


def test_token_error_text_never_holds_the_secret() -> None:
    """An error description that quotes the secret is redacted before anyone sees it."""
    with pytest.raises(TokenError) as caught:
        _parse(
            401,
            {},
            json.dumps(
                {"error": "invalid_client", "error_description": f"bad {DEMO_CLIENT_SECRET}!"}
            ).encode(),
            0.0,
            "",
            (DEMO_CLIENT_SECRET,),
        )
    assert DEMO_CLIENT_SECRET not in str(caught.value) + caught.value.for_operator()
    assert caught.value.said == "bad <SECRET>!"
    assert caught.value.permanent


ODD_SECRET = 'p@ss+w/rd=&\u00e9"x demo-secret'
"""A secret that form encoding, JSON escaping and Basic encoding each write differently."""


async def _shown(client: aiohttp.ClientSession, proxy: Proxy) -> list[str]:
    """What clients, readiness and metrics show while no token is held."""
    shown = []
    for path in ("/x", "/-/readyz", "/-/metrics"):
        async with client.get(proxy.url + path) as response:
            shown.append(await response.text())
    return shown


@pytest.mark.parametrize(
    ("client_auth", "request_format"),
    [("post", "json"), ("post", "form"), ("basic", "json")],
)
async def test_an_issuer_quoting_the_request_leaks_no_secret(
    token_server: StandInTokenServer,
    upstream: StandInUpstream,
    client: aiohttp.ClientSession,
    logs: LogCapture,
    client_auth: str,
    request_format: str,
) -> None:
    """An error description quoting the request, the secret in whatever encoding it was sent,
    reaches the log only, redacted: never a client or readiness."""
    token_server.fail_always = "echo"
    settings = make_settings(
        token_server,
        upstream,
        auth={
            "client_secret": Secret(ODD_SECRET),
            "client_auth": client_auth,
            "request_format": request_format,
        },
    )
    async with Proxy(settings) as proxy:
        await wait_for(lambda: proxy.app[TOKENS].last_error is not None)
        shown = await _shown(client, proxy)
    sent = token_server.requests[0]
    authorization = sent.headers.get("Authorization", "").removeprefix("Basic ")
    forms = [ODD_SECRET, json.dumps(ODD_SECRET)[1:-1], "p%40ss%2Bw%2Frd", authorization]
    outputs = [*shown, logs.text()]
    assert [form for form in forms if form and any(form in text for text in outputs)] == []
    assert "the token endpoint said: got " in logs.text()  # the operator still reads it


async def test_an_issuer_quoting_a_token_as_its_error_code_leaks_no_token(
    start_proxy: ProxyFactory,
    token_server: StandInTokenServer,
    upstream: StandInUpstream,
    client: aiohttp.ClientSession,
    logs: LogCapture,
) -> None:
    """A token where the error code belongs is no code: the failure counts as the proxy's
    token_endpoint_error, in metrics and readiness, and the token shows nowhere."""
    logs.watch(token_server.issued)
    async with start_proxy() as proxy:
        await wait_ready(proxy)
        token_server.fail_always = "token_as_code"
        upstream.rejected_tokens.update(token_server.issued)  # the refetch meets the failure
        await exchange(proxy.port, GET)
        await wait_for(lambda: proxy.app[TOKENS].last_error is not None)
        shown = await _shown(client, proxy)
    assert [text for text in shown if token_server.issued[0] in text] == []
    assert 'sparks_proxy_token_requests_total{result="token_endpoint_error"}' in shown[2]


async def test_token_expired_on_arrival_is_a_failure_not_a_loop(
    start_proxy: ProxyFactory,
    token_server: StandInTokenServer,
    upstream: StandInUpstream,
    client: aiohttp.ClientSession,
) -> None:
    """A 2 s token that takes 2.5 s to arrive is never used, and fetching backs off."""
    token_server.expires_in = 2
    token_server.delay = 2.5
    async with start_proxy(auth={"max_backoff": 30.0}) as proxy:
        tokens = proxy.app[TOKENS]
        await wait_for(lambda: tokens.last_error is not None, timeout=5)
        assert tokens.last_error is not None
        assert tokens.last_error.code == "token_expired_on_arrival"
        async with client.get(proxy.url + "/x") as response:
            assert response.status == 503
        await asyncio.sleep(1.0)
    assert upstream.received == []
    assert len(token_server.requests) <= 2


async def test_refresher_survives_an_unexpected_failure(
    start_proxy: ProxyFactory, token_server: StandInTokenServer, client: aiohttp.ClientSession
) -> None:
    """A body that breaks the JSON parser (deeply nested) is a named failure, then recovery."""
    token_server.failures = ["deep_json"]
    async with start_proxy() as proxy:
        tokens = proxy.app[TOKENS]
        await wait_for(lambda: tokens.last_error is not None)
        assert tokens.last_error is not None
        assert tokens.last_error.code == "bad_token_response"
        await wait_ready(proxy, timeout=5)  # the next attempt, after the backoff, succeeds
        async with client.get(proxy.url + "/x") as response:
            assert response.status == 200


async def test_upstream_refusing_every_token_gets_fewer_and_fewer(
    proxy: Proxy, upstream: StandInUpstream, token_server: StandInTokenServer
) -> None:
    """Every token rejected: replacements wait 1, 2, 4 ... s, not one token per request."""
    upstream.reject_all = True
    loop = asyncio.get_running_loop()
    started = loop.time()
    statuses = set()
    while loop.time() - started < 4.0:
        statuses.add((await exchange(proxy.port, GET)).status)
        await asyncio.sleep(0.05)
    assert statuses == {401}
    # At ~0 s (first token), ~0 s (first replacement), ~1 s and ~3 s: four in four seconds.
    assert 3 <= len(token_server.issued) <= 5


async def test_unwritable_token_cache_directory_still_gets_a_token(
    token_server: StandInTokenServer, upstream: StandInUpstream, tmp_path: Path
) -> None:
    """A cache file on a read-only directory costs the sharing, never the token."""
    cache_dir = tmp_path / "ro"
    cache_dir.mkdir()
    settings = make_settings(
        token_server, upstream, auth={"token_cache_file": str(cache_dir / "token.json")}
    )
    cache_dir.chmod(0o555)
    try:
        if os.geteuid() == 0:  # root ignores permissions: make the lock's path unopenable
            cache_dir.chmod(0o755)
            (cache_dir / "token.json.lock").mkdir()
        async with Proxy(settings) as proxy:
            await wait_ready(proxy, timeout=5)
            response = await exchange(proxy.port, GET)
    finally:
        cache_dir.chmod(0o755)
    assert response.status == 200
    assert len(token_server.issued) == 1


async def test_refresh_does_not_spin_on_its_own_shared_token(
    token_server: StandInTokenServer, upstream: StandInUpstream, tmp_path: Path
) -> None:
    """With a shared file, a due refresh fetches a new token instead of re-reading its own."""
    token_server.expires_in = 6
    settings = make_settings(
        token_server,
        upstream,
        auth={"token_cache_file": str(tmp_path / "token.json"), "refresh_margin": 3.0},
    )
    loads = 0

    class CountingStore(FileTokenStore):
        async def load(self) -> Token | None:
            nonlocal loads
            loads += 1
            return await super().load()

    store = CountingStore(str(tmp_path / "token.json"), CredentialIdentity.of(settings.auth))
    # With the most jitter the refresh falls due 0.3 s before the margin: the stored token is
    # then still good enough to take (3.3 s left), and only its being our own rules it out.
    async with client_session(settings) as session:
        tokens = TokenManager(
            settings.auth, TokenEndpoint(settings.auth, session), store=store, jitter=lambda: 1.0
        )
        await tokens.start()
        try:
            await wait_for(lambda: len(token_server.issued) == 2, timeout=8)
            await asyncio.sleep(0.5)
            token = tokens.current()
        finally:
            await tokens.close()
    assert len(token_server.issued) == 2  # and no third, right after
    assert token is not None
    assert token.value == token_server.issued[1]
    # start, the first fetch (before and after its lock), the refresh likewise: a re-read of
    # our own token would have gone round that loop until the margin, hundreds of times.
    assert loads <= 6


async def test_a_rejected_token_is_never_taken_back_from_the_shared_file(
    token_server: StandInTokenServer, upstream: StandInUpstream, tmp_path: Path
) -> None:
    """Two proxies share a file; the upstream revokes their token: one new token for both."""
    settings = make_settings(
        token_server, upstream, auth={"token_cache_file": str(tmp_path / "token.json")}
    )
    async with Proxy(settings) as a, Proxy(settings) as b:
        await wait_ready(a)
        await wait_ready(b)
        assert len(token_server.issued) == 1
        upstream.rejected_tokens.add(token_server.issued[0])
        first = await exchange(a.port, GET)
        second = await exchange(b.port, GET)
    assert (first.status, second.status) == (200, 200)
    # a replaced the revoked token and stored it; b read the new one instead of fetching.
    assert len(token_server.issued) == 2
    assert upstream.received[-1].header("Authorization") == [f"Bearer {token_server.issued[1]}"]


async def test_waiting_on_a_hung_lock_holder_takes_the_token_it_stored(
    token_server: StandInTokenServer, upstream: StandInUpstream, tmp_path: Path
) -> None:
    """A holder that stored a token but never lets go: waiters use it at once, no fetch."""
    cache = tmp_path / "token.json"
    settings = make_settings(
        token_server, upstream, auth={"token_cache_file": str(cache), "timeout": 5.0}
    )
    with open(f"{cache}.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the hung holder; the proxy would wait 10 s
        async with Proxy(settings) as proxy:
            await asyncio.sleep(0.3)
            stored = Token(value="stored.by.the.holder", expires_at=time.monotonic() + 3600,
                           lifetime=3600)  # fmt: skip
            await FileTokenStore(str(cache), CredentialIdentity.of(settings.auth)).save(stored)
            await wait_ready(proxy, timeout=5)  # well before the lock wait (10 s) ends
            token = proxy.app[TOKENS].current()
    assert token is not None
    assert token.value == "stored.by.the.holder"
    assert token_server.requests == []


READYZ = b"GET /-/readyz HTTP/1.1\r\nHost: proxy.test\r\n\r\n"


@pytest.mark.parametrize(
    "damage",
    ["deep", "not_utf8", "huge_integer", "nan", "infinity", "far_future"],
)
async def test_a_damaged_token_cache_entry_costs_one_token_request(
    token_server: StandInTokenServer, upstream: StandInUpstream, tmp_path: Path, damage: str
) -> None:
    """Whatever wrote the file: no crash, no token kept forever, one fetch and a good file."""
    cache = tmp_path / "token.json"
    settings = make_settings(token_server, upstream, auth={"token_cache_file": str(cache)})
    key = fingerprint(CredentialIdentity.of(settings.auth))
    entry = {"access_token": "stale.token", "lifetime": 3600, "expires": 0}
    expires = {
        "huge_integer": "9" * 400,  # float(): OverflowError
        "nan": "NaN",  # never expires, so never refreshed
        "infinity": "Infinity",
        "far_future": str(time.time() + 400 * 86400),  # past any token's lifetime
    }
    text = json.dumps({key: entry}).replace('"expires": 0', f'"expires": {expires.get(damage)}')
    damaged = {"deep": b"[" * 100_000, "not_utf8": b'{"\xff\xfe": 1}'}  # RecursionError, and
    cache.write_bytes(damaged.get(damage, text.encode()))  # UnicodeDecodeError
    async with Proxy(settings) as proxy:
        await wait_ready(proxy)
        forwarded = await exchange(proxy.port, GET)
        ready = await exchange(proxy.port, READYZ)
    assert (forwarded.status, ready.status) == (200, 200)
    assert len(token_server.issued) == 1
    assert upstream.received[-1].header("Authorization") == [f"Bearer {token_server.issued[0]}"]
    assert json.loads(cache.read_text())[key]["access_token"] == token_server.issued[0]


async def test_a_token_cache_file_that_cannot_be_read_or_written_shows_in_readiness(
    token_server: StandInTokenServer, upstream: StandInUpstream, tmp_path: Path
) -> None:
    """The sharing stops, never the token; /-/readyz says the shared cache is not working."""
    cache = tmp_path / "token.json"
    settings = make_settings(token_server, upstream, auth={"token_cache_file": str(cache)})
    cache.mkdir()  # after the config check: as if replaced while running
    async with Proxy(settings) as proxy:
        await wait_ready(proxy)
        forwarded = await exchange(proxy.port, GET)
        broken = json.loads((await exchange(proxy.port, READYZ)).body)
        cache.rmdir()  # a file can be written again: the next fetch shares its token
        proxy.app[TOKENS].invalidate(proxy.app[TOKENS].current())
        await wait_for(lambda: proxy.app[TOKENS].shared_cache_healthy is True)
        mended = json.loads((await exchange(proxy.port, READYZ)).body)
    assert forwarded.status == 200
    assert broken["status"] == "ready"
    assert broken["checks"]["shared_token_cache"] == {"ok": False}
    assert mended["checks"]["shared_token_cache"] == {"ok": True}
    assert len(token_server.issued) == 2


async def test_a_proxy_backing_off_takes_the_token_a_sibling_stored(
    token_server: StandInTokenServer, upstream: StandInUpstream, tmp_path: Path
) -> None:
    """Two proxies share a file; one is told to wait 30 s (429): it takes the other's token."""
    token_server.failures = ["429"]
    token_server.retry_after = 30
    settings = make_settings(
        token_server, upstream, auth={"token_cache_file": str(tmp_path / "token.json")}
    )
    async with Proxy(settings) as a, Proxy(settings) as b:
        # The first fetch got the 429 and backs off; the other proxy's fetch got a token.
        await wait_for(lambda: len(token_server.issued) == 1, timeout=5)
        await wait_ready(a, timeout=5)
        await wait_ready(b, timeout=5)
        statuses = [(await exchange(proxy.port, GET)).status for proxy in (a, b)]
        backing_off = [p for p in (a, b) if p.app[TOKENS].retry_after() > 0]
    assert statuses == [200, 200]
    assert len(token_server.requests) == 2  # the 429, then the one token for both
    assert backing_off == []  # the token taken ended the backoff
    bearer = [f"Bearer {token_server.issued[0]}"]
    assert [r.header("Authorization") for r in upstream.received[-2:]] == [bearer, bearer]


async def test_the_refresher_outlives_a_store_that_fails_while_it_backs_off(
    token_server: StandInTokenServer, upstream: StandInUpstream, tmp_path: Path, logs: LogCapture
) -> None:
    """A store raising while the manager looks in it during a backoff: a token all the same."""
    token_server.failures = ["429"]
    token_server.retry_after = 1
    settings = make_settings(
        token_server, upstream, auth={"token_cache_file": str(tmp_path / "token.json")}
    )
    loads = 0

    class FailingOnceStore(FileTokenStore):
        async def load(self) -> Token | None:
            nonlocal loads
            loads += 1
            if loads == 3:  # at start, before the 429, then this one: during the backoff
                raise RuntimeError("store broke")
            return await super().load()

    store = FailingOnceStore(str(tmp_path / "token.json"), CredentialIdentity.of(settings.auth))
    async with client_session(settings) as session:
        tokens = TokenManager(settings.auth, TokenEndpoint(settings.auth, session), store=store)
        await tokens.start()
        try:
            await wait_for(lambda: tokens.current() is not None, timeout=6)
        finally:
            await tokens.close()
    assert loads >= 4
    assert len(token_server.issued) == 1
    assert "unexpected error reading the shared token (RuntimeError)" in logs.text()


def test_a_stored_token_from_a_clock_a_little_ahead_is_taken() -> None:
    """Another host's clock a minute ahead: its 30-day token is not taken for a damaged one."""
    entry = {"access_token": "a.b", "expires": time.time() + MAX_LIFETIME + 60, "lifetime": 1}
    token = decode(entry)
    assert token is not None
    assert token.remaining() > MAX_LIFETIME
