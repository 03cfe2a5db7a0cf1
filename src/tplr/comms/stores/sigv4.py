"""AWS Signature Version 4 query signing (presigned URLs) for S3, without botocore.

``tplr fetch s3://…`` needs two things from the bucket: a HEAD for size and ETag and one
GET URL for the ranged parts. Both are presigned URLs, so the command can start without
importing and initialising botocore and aiohttp (about half a second of a 1 GiB fetch on
2 cores, measured in ``docs/transfers.md``). The algorithm is the published one: a
canonical request (method, URI-encoded path, sorted query, the ``host`` header, an
unsigned payload), its SHA-256 in a string to sign under the credential scope
``DATE/REGION/s3/aws4_request``, and an HMAC-SHA256 chain from the secret key. Tests check
the URLs against a moto server that enforces signatures.

The secret is a ``SecretStr``; it is only ever an HMAC key here.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from urllib.parse import quote, urlsplit

from pydantic import SecretStr

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
MAX_EXPIRES_S = 7 * 24 * 3600


def _encode(text: str, *, keep_slash: bool) -> str:
    return quote(text, safe="/~" if keep_slash else "~")


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()


def presign_url(
    method: str,
    url: str,
    *,
    access_key_id: SecretStr,
    secret_access_key: SecretStr,
    region: str,
    expires_s: int,
    now: datetime | None = None,
) -> str:
    """``url`` (an S3 object URL, path-style, already percent-encoded) signed for
    ``method`` by query parameters, valid for ``expires_s`` seconds from ``now``."""
    if not 1 <= expires_s <= MAX_EXPIRES_S:
        raise ValueError(f"expires_s must be within 1..{MAX_EXPIRES_S}, got {expires_s}")
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    stamp, day = moment.strftime("%Y%m%dT%H%M%SZ"), moment.strftime("%Y%m%d")
    scope = f"{day}/{region}/s3/aws4_request"
    parts = urlsplit(url)
    params = {
        "X-Amz-Algorithm": ALGORITHM,
        "X-Amz-Credential": f"{access_key_id.get_secret_value()}/{scope}",
        "X-Amz-Date": stamp,
        "X-Amz-Expires": str(expires_s),
        "X-Amz-SignedHeaders": "host",
    }
    query = "&".join(
        f"{_encode(k, keep_slash=False)}={_encode(v, keep_slash=False)}"
        for k, v in sorted(params.items())
    )
    canonical = "\n".join(
        [method, parts.path or "/", query, f"host:{parts.netloc}\n", "host", UNSIGNED_PAYLOAD]
    )
    to_sign = "\n".join(
        [ALGORITHM, stamp, scope, hashlib.sha256(canonical.encode("utf-8")).hexdigest()]
    )
    key = ("AWS4" + secret_access_key.get_secret_value()).encode("utf-8")
    for part in (day, region, "s3", "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"{parts.scheme}://{parts.netloc}{parts.path}?{query}&X-Amz-Signature={signature}"


def object_url(endpoint: str, bucket: str, key: str) -> str:
    """The path-style URL of ``key`` in ``bucket`` (each byte of the key URI-encoded as
    SigV4 wants it: everything but unreserved characters and ``/``)."""
    return f"{endpoint.rstrip('/')}/{bucket}/{_encode(key, keep_slash=True)}"
