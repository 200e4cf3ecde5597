"""Credentials out of every address tenx prints, logs or answers with.

A Redis URL may carry a user and a password (`redis://user:secret@host:6379/0`, or
`?password=` in its query); tenx prints where it reads and writes (`tenx serve`,
`stream`, `materialize`, errors, the feature API's 503 bodies and /health). Every such
place shows `redact_url(url)`: the password (and any secret-looking query value) becomes
`***`, the rest stays, so the message still says which server was meant.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
_SECRET_KEYS = re.compile(r"pass|secret|token|key|credential|auth", re.IGNORECASE)
# user:password@ in anything that looks like a URL, for text we did not build ourselves
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:@/\s]*):(?P<password>[^@\s]+)@")


def redact_url(url: str) -> str:
    """The URL with its password and secret query values masked.

    >>> redact_url("redis://default:s3cret@cache:6379/0")
    'redis://default:***@cache:6379/0'
    >>> redact_url("rediss://cache:6380/0?password=s3cret&ssl_cert_reqs=none")
    'rediss://cache:6380/0?password=%2A%2A%2A&ssl_cert_reqs=none'
    >>> redact_url("redis://cache:6379/0")
    'redis://cache:6379/0'
    >>> redact_url("redis://tenx:Pw/x9#q@cache:6379/0")
    'redis://tenx:***@cache:6379/0'
    """
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        # The userinfo by hand: a password holding `/`, `#` or `?` (generated ones do)
        # ends urlsplit's netloc early, which then found no `@` and masked nothing.
        userinfo, _, after = rest.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        if colon:
            url = f"{scheme}://{user}:{MASK}@{after}"
    if "://" not in url:  # host:port without a scheme, maybe with user:password@ in front
        userinfo, at, host = url.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        return f"{user}:{MASK}@{host}" if at and colon else url
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{host}" if colon else f"{userinfo}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_KEYS.search(key) for key, _ in pairs):
            query = urlencode([(key, MASK if _SECRET_KEYS.search(key) else value) for key, value in pairs])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """`user:password@` of every URL inside a text masked (an error message from a
    library that quotes the URL it was given).

    >>> redact_text("Error connecting to redis://u:pw@h:1/0: refused")
    'Error connecting to redis://u:***@h:1/0: refused'
    """
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)


__all__ = ["MASK", "redact_text", "redact_url"]
