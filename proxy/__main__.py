"""The command line: parse arguments, load settings, run. The only place that exits.

Exit status: 0 success; 1 the token endpoint refused or failed (``check``, ``token``);
2 the configuration is unusable (one line on stderr naming the key).
"""

from __future__ import annotations

import gc

# Importing aiohttp and the proxy makes some 40,000 objects that live as long as the process.
# The collector would walk them again and again meanwhile, and once more at the end: a sixth
# of the instructions of these imports (callgrind: 1,555M -> 1,304M). So it is off while they
# load, and what they made is frozen out of its reach before it is on again (with the little
# cyclic garbage the imports leave, some 0.4 MB, kept once).
_collecting = gc.isenabled()
gc.disable()
try:
    import argparse
    import dataclasses
    import sys
    import time
    from collections.abc import Mapping, Sequence
    from typing import Any

    from . import __version__, config, logs
    from .app import client_session, token_store
    from .config import Secret, Settings
    from .errors import ConfigError, TokenError
    from .metrics import Metrics
    from .server import Proxy, run, run_loop
    from .standins import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, StandInTokenServer, StandInUpstream
    from .token_endpoint import Token, TokenEndpoint
finally:
    gc.freeze()
    if _collecting:
        gc.enable()

EXIT_TOKEN_FAILED = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        help="TOML settings file (default: $SPARKS_PROXY_CONFIG, else ./config.toml)",
    )
    common.add_argument("--log-level", choices=config.CHOICES["log.level"])
    common.add_argument("--log-format", choices=config.CHOICES["log.format"])
    listen = argparse.ArgumentParser(add_help=False)
    listen.add_argument("--host", help="address to listen on (server.host)")
    listen.add_argument("--port", type=int, help="port to listen on (server.port)")
    workers = argparse.ArgumentParser(add_help=False)
    workers.add_argument(
        "--workers", type=int, help="processes sharing the port and one token (server.workers)"
    )

    parser = argparse.ArgumentParser(
        prog="sparks-proxy",
        description="Local authenticating reverse proxy for the Logicdrop Sparks API.",
        epilog="Settings precedence: flags > SPARKS_PROXY_<SECTION>_<KEY> > file > defaults.",
    )
    parser.add_argument("--version", action="version", version=f"sparks-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("serve", parents=[common, listen, workers], help="run the proxy")
    commands.add_parser(
        "check",
        parents=[common],
        help="validate settings and fetch a token; print its expiry and scope (never the token)",
    )
    commands.add_parser("token", parents=[common], help="print a valid token on stdout")
    commands.add_parser(
        "demo",
        parents=[common, listen],
        help="run the proxy in front of a stand-in token server and upstream (no credentials)",
    )
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {
        "server.host": getattr(args, "host", None),
        "server.port": getattr(args, "port", None),
        "server.workers": getattr(args, "workers", None),
        "log.level": args.log_level,
        "log.format": args.log_format,
    }
    try:
        settings = config.load(args.config, environ, overrides)
        if args.command != "demo":
            config.require_credentials(settings)
    except ConfigError as error:
        print(f"sparks-proxy: config error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    logs.configure(settings.log)
    try:
        if args.command == "serve" and settings.server.workers > 1:
            from .workers import serve_workers  # multiprocessing and ctypes: only when asked for

            serve_workers(settings, settings.server.workers)
        elif args.command == "serve":
            run_loop(run(settings))
        elif args.command == "demo":
            run_loop(_demo(settings))
        elif args.command == "check":
            token = run_loop(_fetch(settings, use_store=False))
            print(
                f"ok: {settings.auth.token_url} issued a token for client "
                f"{settings.auth.client_id!r}: expires in {token.lifetime:.0f} s (at "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(time.time() + token.lifetime))}"
                f"), scope {token.scope or '(none)'!r}"
            )
        else:
            print(run_loop(_fetch(settings, use_store=True)).value)
    except TokenError as error:
        print(
            f"sparks-proxy: token request failed: {error.code}: {error.for_operator()}",
            file=sys.stderr,
        )
        return EXIT_TOKEN_FAILED
    except ConfigError as error:  # settings that only fail in use, e.g. a port already taken
        print(f"sparks-proxy: config error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        pass
    return 0


async def _fetch(settings: Settings, *, use_store: bool) -> Token:
    """One token; with ``use_store``, the shared one (file or Redis) while valid, and a new one
    is shared when fetched."""
    store = token_store(settings, Metrics()) if use_store else None
    try:
        stored = await store.load() if store is not None else None
        if stored is not None:
            return stored
        async with client_session(settings) as session:
            token = await TokenEndpoint(settings.auth, session).fetch()
        if store is not None:
            await store.save(token)
        return token
    finally:
        if store is not None:
            await store.close()


async def _demo(settings: Settings) -> None:
    async with StandInTokenServer() as token_server, StandInUpstream() as upstream:
        # Only the destinations and the credential change; every other setting still applies.
        demo = dataclasses.replace(
            settings,
            upstream=dataclasses.replace(settings.upstream, url=upstream.url),
            auth=dataclasses.replace(
                settings.auth,
                token_url=token_server.token_url,
                client_id=DEMO_CLIENT_ID,
                client_secret=Secret(DEMO_CLIENT_SECRET),
                client_secret_file="",
            ),
        )
        await run(config.validate(demo), on_ready=lambda proxy: _demo_banner(proxy, upstream))


def _demo_banner(proxy: Proxy, upstream: StandInUpstream) -> None:
    print(
        f"""
sparks-proxy demo: the proxy on {proxy.url} forwards to a stand-in upstream ({upstream.url})
with a token from a stand-in token server; no real credentials are used. Try:

  curl -s {proxy.url}/projects/acme?view=full        # echoed upstream, with the proxy's token
  curl -s {proxy.url}/-/readyz                       # ready: a valid token is held
  curl -s {proxy.url}/-/metrics | grep sparks_proxy  # Prometheus metrics

Press Ctrl-C to stop.
""",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
