"""sparks-proxy: a local authenticating reverse proxy for the Logicdrop Sparks API.

It holds the machine credential, keeps a valid OAuth2 client-credentials token, and forwards
every request to the upstream with ``Authorization: Bearer <token>`` added.
"""

from __future__ import annotations

__version__ = "0.1.0"
