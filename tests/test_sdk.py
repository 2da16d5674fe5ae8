"""The official Sparks SDK (PyPI logicdrop-sparks-openapi 4.3.1) through the proxy, unmodified.

The SDK insists on fetching a token itself before calls, and sends X-Logicdrop-ApiKey on every
call. Pointed at the proxy (``host`` and ``token_url``), it needs no real secret at all.
"""

from __future__ import annotations

import asyncio

from logicdrop.sparks.openapi import ApiClient, Configuration, ProjectServicesApi

from proxy.admin import PLACEHOLDER_TOKEN
from proxy.server import Proxy
from proxy.standins import StandInTokenServer, StandInUpstream


def _call_sdk(base_url: str) -> int:
    configuration = Configuration(
        host=base_url,
        token_url=base_url + "/-/oauth/token",
        client_id="unused-by-the-proxy",
        client_secret="unused-by-the-proxy",
        api_key={"X-Logicdrop-ApiKey": "dummy-key"},
    )
    api = ProjectServicesApi(ApiClient(configuration))
    # Raw answer: the stand-in upstream's echo is not a Project document.
    response = api.get_project_with_http_info("acme", "p1", _preload_content=False)
    return int(response[1])


async def test_official_sdk_works_through_the_proxy(
    proxy: Proxy, upstream: StandInUpstream, token_server: StandInTokenServer
) -> None:
    """The SDK's call reaches the upstream with the proxy's real token, none of its own."""
    status = await asyncio.to_thread(_call_sdk, proxy.url)
    assert status == 200
    seen = upstream.received[-1]
    assert seen.method == "GET"
    assert seen.target == "/projects/acme/p1"
    assert seen.header("Authorization") == [f"Bearer {token_server.issued[0]}"]
    assert seen.header("X-Logicdrop-ApiKey") == []
    assert PLACEHOLDER_TOKEN not in str(seen.headers)
    assert len(token_server.requests) == 1  # the SDK's own token request never left the proxy
