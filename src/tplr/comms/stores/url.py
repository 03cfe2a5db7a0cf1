"""Turn a location into a store and key: ``s3://BUCKET/KEY``, ``https://host/path/FILE``,
``hf://datasets/OWNER/REPO/FILE``, ``file:///abs/path`` or a plain local path.

``hf://datasets/OWNER/REPO[@REVISION]/PATH`` (or ``…/PATH@REVISION``) names a file of a
dataset on the hub: ``{HF_ENDPOINT}/datasets/OWNER/REPO/resolve/{REVISION}/PATH``
(``HF_ENDPOINT`` defaults to ``https://huggingface.co``, revision ``main``), read with
``HF_TOKEN`` when set and listed through the hub's tree API. ``http(s)://`` URLs are read
as they are (:class:`~tplr.comms.stores.http.HttpStore`, read-only); ``TPLR_CA_BUNDLE``
names a CA bundle to trust for them.

Credentials come from the environment, read only when :func:`open_store_for_url` is
called (never at import):

- the R2 names of a deployment, when the URL's bucket is the configured one:
  ``R2_DATASET_BUCKET_NAME`` with ``R2_DATASET_READ_ACCESS_KEY_ID`` /
  ``R2_DATASET_READ_SECRET_ACCESS_KEY``, or ``R2_GRADIENTS_BUCKET_NAME`` with the
  ``R2_GRADIENTS_WRITE_*`` (writing) or ``R2_GRADIENTS_READ_*`` keys (reading; the write
  keys also serve), plus that bucket's ``*_ACCOUNT_ID`` / ``*_ENDPOINT_URL``;
- otherwise the generic ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` with
  ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (or ``AWS_REGION`` for AWS itself).

An explicit ``endpoint_url`` (``--endpoint-url``) overrides the endpoint from the environment.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import quote, unquote, urlsplit

from pydantic import SecretStr

from tplr.comms.config import BucketConfig
from tplr.comms.stores.base import ObjectStore
from tplr.comms.transfer_config import TransferConfig
from tplr.errors import ConfigError

Access = Literal["read", "write"]
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
# Buckets of a templar deployment: env prefix -> key kinds usable for (reading, writing).
_R2_BUCKETS = {
    "R2_DATASET_": {"read": ("READ",), "write": ()},
    "R2_GRADIENTS_": {"read": ("READ", "WRITE"), "write": ("WRITE",)},
}


DEFAULT_HF_ENDPOINT = "https://huggingface.co"
_HF_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


@dataclass(frozen=True, slots=True)
class StoreUrl:
    """A parsed location: an S3 bucket and key, a local root folder and key, or an
    HTTP(S) base URL and key (``tree_api``: the hub's listing of that base)."""

    scheme: Literal["s3", "file", "http"]
    key: str
    bucket: str | None = None
    root: Path | None = None
    base_url: str | None = None
    tree_api: str | None = None
    hub: bool = False


def _split(url: str):
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (a bad port raises here)
    except ValueError as exc:
        raise ConfigError(f"malformed URL {url[:200]!r}: {exc}", hint="check the URL") from None
    return parts


def _parse_http_url(url: str) -> StoreUrl:
    parts = _split(url)
    if not parts.hostname or parts.query or parts.fragment or parts.username:
        raise ConfigError(
            f"unsupported HTTP(S) URL {url!r}",
            hint="write https://HOST/PATH/FILE (no user, query or fragment)",
        )
    folder, _, name = parts.path.rpartition("/")
    base = f"{parts.scheme}://{parts.netloc}{folder}/"
    return StoreUrl(scheme="http", key=unquote(name), base_url=base)


def _parse_hf_url(url: str, endpoint: str) -> StoreUrl:
    """``hf://datasets/OWNER/REPO[@REV][/PATH[@REV]]`` (see the module doc)."""
    kind, _, rest = url.removeprefix("hf://").partition("/")
    owner, _, rest = rest.partition("/")
    repo, _, path = rest.partition("/")
    repo, _, revision = repo.partition("@")
    if not revision and "@" in path.rpartition("/")[2]:
        path, _, revision = path.rpartition("@")
    bad = kind != "datasets" or not (_HF_NAME.match(owner) and _HF_NAME.match(repo))
    if bad or ".." in path.split("/") or path.startswith("/"):
        raise ConfigError(
            f"invalid hub URL {url!r}",
            hint="write hf://datasets/OWNER/REPO/PATH, optionally with @REVISION after"
            " REPO or PATH",
        )
    revision = quote(revision or "main", safe="")
    root = endpoint.rstrip("/")
    base = f"{root}/datasets/{owner}/{repo}/resolve/{revision}/"
    tree = f"{root}/api/datasets/{owner}/{repo}/tree/{revision}/"
    return StoreUrl(scheme="http", key=path, base_url=base, tree_api=tree, hub=True)


def parse_store_url(url: str, *, hf_endpoint: str = DEFAULT_HF_ENDPOINT) -> StoreUrl:
    """Parse ``s3://BUCKET/KEY``, ``http(s)://…``, ``hf://…``, ``file:///abs/path`` or a path.

    A local path ``/data/x.bin`` becomes root ``/data`` and key ``x.bin``; one that ends
    in ``/`` (a folder) becomes that folder with an empty key (a prefix for listing).
    """
    if url.startswith(("https://", "http://")):
        return _parse_http_url(url)
    if url.startswith("hf://"):
        return _parse_hf_url(url, hf_endpoint)
    if url.startswith("s3://"):
        bucket, _, key = url.removeprefix("s3://").partition("/")
        if not _BUCKET_RE.match(bucket):
            raise ConfigError(
                f"invalid bucket name {bucket!r} in {url!r}",
                hint="write s3://BUCKET/KEY; bucket names are 3-63 lowercase letters,"
                " digits, '.' or '-'",
            )
        return StoreUrl(scheme="s3", bucket=bucket, key=key)
    if url.startswith("file:"):
        parts = _split(url)
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(
                f"file URL {url!r} names host {parts.netloc!r}",
                hint="use file:///absolute/path (three slashes) for a local file",
            )
        path_text = unquote(parts.path)
    elif "://" in url:
        raise ConfigError(
            f"unsupported URL scheme in {url!r}",
            hint="use s3://BUCKET/KEY, https://HOST/PATH, hf://datasets/OWNER/REPO/PATH,"
            " file:///absolute/path or a plain local path",
        )
    else:
        path_text = url
    if not path_text:
        raise ConfigError(f"empty path in {url!r}", hint="name a file or a folder")
    path = Path(path_text).expanduser().absolute()
    if path_text.endswith("/"):
        return StoreUrl(scheme="file", key="", root=path)
    return StoreUrl(scheme="file", key=path.name, root=path.parent)


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return value.strip() if value and value.strip() else None


def _rate(env: Mapping[str, str], name: str) -> float | None:
    text = _get(env, name)
    if text is None:
        return None
    try:
        rate = float(text)
    except ValueError:
        rate = 0.0
    if rate <= 0:
        raise ConfigError(f"{name}={text!r} is not a positive number of requests per second")
    return rate


def _r2_bucket_config(
    env: Mapping[str, str], prefix: str, bucket: str, access: Access, endpoint_url: str | None
) -> BucketConfig | None:
    """The deployment's own settings for ``bucket``, if it is the configured one."""
    if _get(env, f"{prefix}BUCKET_NAME") != bucket:
        return None
    kinds = _R2_BUCKETS[prefix][access]
    for kind in kinds:
        key_id = _get(env, f"{prefix}{kind}_ACCESS_KEY_ID")
        secret = _get(env, f"{prefix}{kind}_SECRET_ACCESS_KEY")
        if key_id and secret:
            endpoint = endpoint_url or _get(env, f"{prefix}ENDPOINT_URL")
            account = _get(env, f"{prefix}ACCOUNT_ID")
            if not (endpoint or account):
                raise ConfigError(
                    f"no endpoint for s3://{bucket}",
                    hint=f"set {prefix}ACCOUNT_ID (Cloudflare R2) or {prefix}ENDPOINT_URL,"
                    " or pass --endpoint-url",
                )
            return BucketConfig(
                bucket_name=bucket,
                access_key_id=SecretStr(key_id),
                secret_access_key=SecretStr(secret),
                account_id=account,
                endpoint_url=endpoint,
                requests_per_second=_rate(env, f"{prefix}REQUESTS_PER_SECOND"),
            )
    return None


def _generic_bucket_config(
    env: Mapping[str, str], bucket: str, endpoint_url: str | None
) -> BucketConfig | None:
    key_id, secret = _get(env, "AWS_ACCESS_KEY_ID"), _get(env, "AWS_SECRET_ACCESS_KEY")
    if not (key_id and secret):
        return None
    endpoint = endpoint_url or _get(env, "AWS_ENDPOINT_URL_S3") or _get(env, "AWS_ENDPOINT_URL")
    region = _get(env, "AWS_REGION") or _get(env, "AWS_DEFAULT_REGION")
    if not endpoint and region:
        endpoint = f"https://s3.{region}.amazonaws.com"
    if not endpoint:
        raise ConfigError(
            f"no endpoint for s3://{bucket}",
            hint="set AWS_ENDPOINT_URL (e.g. https://ACCOUNT_ID.r2.cloudflarestorage.com),"
            " or AWS_REGION for AWS S3, or pass --endpoint-url",
        )
    if not region:  # R2 names its region 'auto'; most other servers expect us-east-1
        region = "auto" if ".r2.cloudflarestorage.com" in endpoint else "us-east-1"
    return BucketConfig(
        bucket_name=bucket,
        access_key_id=SecretStr(key_id),
        secret_access_key=SecretStr(secret),
        endpoint_url=endpoint,
        region=region,
    )


def bucket_config_for(
    bucket: str,
    *,
    access: Access = "read",
    endpoint_url: str | None = None,
    env: Mapping[str, str] | None = None,
) -> BucketConfig:
    """Credentials and endpoint for ``bucket`` from the environment (see module doc)."""
    env = os.environ if env is None else env
    for prefix in _R2_BUCKETS:
        found = _r2_bucket_config(env, prefix, bucket, access, endpoint_url)
        if found is not None:
            return found
    found = _generic_bucket_config(env, bucket, endpoint_url)
    if found is not None:
        return found
    raise _missing_credentials(env, bucket, access)


def _missing_credentials(env: Mapping[str, str], bucket: str, access: Access) -> ConfigError:
    """Name exactly which variables would make ``bucket`` usable."""
    message = f"no credentials to {access} s3://{bucket}"
    generic = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL or --endpoint-url)"
    for prefix, kinds in _R2_BUCKETS.items():
        if _get(env, f"{prefix}BUCKET_NAME") != bucket:
            continue
        if not kinds[access]:
            return ConfigError(
                f"{message}: the {prefix}* keys only read this bucket",
                hint=f"set {generic} to keys that may {access} it",
            )
        wanted = " and ".join(
            f"{prefix}{kinds[access][0]}_{part}" for part in ("ACCESS_KEY_ID", "SECRET_ACCESS_KEY")
        )
        return ConfigError(
            f"{message}: {prefix}BUCKET_NAME names it but its keys are not set",
            hint=f"set {wanted} (see .env.example), or {generic}",
        )
    write_keys = "R2_GRADIENTS_WRITE_ACCESS_KEY_ID, R2_GRADIENTS_WRITE_SECRET_ACCESS_KEY"
    read_keys = "R2_DATASET_READ_ACCESS_KEY_ID, R2_DATASET_READ_SECRET_ACCESS_KEY"
    r2 = (
        f"R2_GRADIENTS_BUCKET_NAME={bucket} with {write_keys} and R2_GRADIENTS_ACCOUNT_ID"
        if access == "write"
        else f"R2_DATASET_BUCKET_NAME={bucket} with {read_keys} and R2_DATASET_ACCOUNT_ID"
        " (or the R2_GRADIENTS_* equivalents)"
    )
    return ConfigError(message, hint=f"set {generic}; or {r2}")


def http_store_for(location: StoreUrl, env: Mapping[str, str]) -> ObjectStore:
    """The read-only store of an ``http``/``hf`` location; ``HF_TOKEN`` (hub only) and
    ``TPLR_CA_BUNDLE`` come from ``env``."""
    from tplr.comms.stores.http import HttpSource, HttpStore

    assert location.base_url is not None
    token = _get(env, "HF_TOKEN") if location.hub else None
    bundle = _get(env, "TPLR_CA_BUNDLE")
    hint = (
        "the repository or file is private or gated: set HF_TOKEN to a token that may read it"
        if location.hub
        else "the server refused the request; check the URL and any access it needs"
    )
    source = HttpSource(
        base_url=location.base_url,
        token=SecretStr(token) if token else None,
        ca_bundle=Path(bundle) if bundle else None,
        tree_api=location.tree_api,
        hint=hint,
    )
    return HttpStore(source)


def dataset_source_store(
    source_url: str,
    *,
    hf_endpoint: str = DEFAULT_HF_ENDPOINT,
    hf_token: SecretStr | None = None,
    ca_bundle: str | None = None,
) -> ObjectStore:
    """The read-only store of ``DATASET_SOURCE_URL``: an ``https://`` folder or a hub
    dataset ``hf://datasets/OWNER/REPO[@REVISION]`` (its root; the folder goes in
    ``DATASET_BINS_PATH``)."""
    url = source_url if source_url.startswith("hf://") else source_url.rstrip("/") + "/"
    location = parse_store_url(url, hf_endpoint=hf_endpoint)
    if location.scheme != "http" or location.key:
        raise ConfigError(
            f"DATASET_SOURCE_URL={source_url!r} is not an https:// folder or a hub repository",
            hint="use https://HOST/PATH/ or hf://datasets/OWNER/REPO, and put the folder"
            " inside it in DATASET_BINS_PATH",
        )
    env = {
        "HF_TOKEN": hf_token.get_secret_value() if hf_token else "",
        "TPLR_CA_BUNDLE": ca_bundle or "",
    }
    return http_store_for(location, env)


def signed_bucket_reader(
    config: BucketConfig,
    env: Mapping[str, str],
    *,
    transfer: TransferConfig | None = None,
    max_connections: int = 16,
) -> ObjectStore | None:
    """A read-only store for the bucket that presigns its own requests (SigV4, no botocore:
    the fast start of ``tplr fetch``), or None when an HTTP proxy applies to the endpoint
    (only the S3 client honours proxies). A HEAD or GET that fails is asked again through
    the S3 client, whose error is the precise one (and which works where a server does
    not take presigned requests)."""
    import urllib.request

    from tplr.comms.download.http import URL_EXPIRES_S
    from tplr.comms.stores.http import HttpSource, HttpStore
    from tplr.comms.stores.sigv4 import presign_url

    endpoint = config.resolved_endpoint().rstrip("/")
    host = _split(endpoint).hostname or ""
    if urllib.request.getproxies().get(_split(endpoint).scheme) and not urllib.request.proxy_bypass(
        host
    ):
        return None

    def sign(method: str, url: str) -> str:
        return presign_url(
            method,
            url,
            access_key_id=config.access_key_id,
            secret_access_key=config.secret_access_key,
            region=config.region,
            expires_s=URL_EXPIRES_S,
        )

    bundle = _get(env, "AWS_CA_BUNDLE") or _get(env, "REQUESTS_CA_BUNDLE")
    source = HttpSource(
        base_url=f"{endpoint}/{config.bucket_name}/",
        ca_bundle=Path(bundle) if bundle else None,
        hint="check the access key id and secret for this bucket, and that the key may read it",
        signer=sign,
        display_base=f"s3://{config.bucket_name}/",
    )

    def s3_client_store() -> contextlib.AbstractAsyncContextManager[ObjectStore]:
        from tplr.comms.stores.s3 import S3Store

        return S3Store(config, transfer, max_connections=max_connections)

    timeout_s = (transfer or TransferConfig.model_construct()).transfer_read_timeout_s
    return HttpStore(source, timeout_s=timeout_s, fallback=s3_client_store)


@contextlib.asynccontextmanager
async def open_store_for_url(
    url: str,
    *,
    endpoint_url: str | None = None,
    transfer: TransferConfig | None = None,
    max_connections: int = 16,
    env: Mapping[str, str] | None = None,
    access: Access = "read",
    signed_reads: bool = False,
) -> AsyncIterator[tuple[ObjectStore, str]]:
    """``async with open_store_for_url(url) as (store, key):`` for any supported URL.

    ``signed_reads``: read an ``s3://`` bucket through presigned URLs (HEAD, GET, ranged
    GETs) without the S3 client: what ``tplr fetch`` uses to start fast."""
    env = os.environ if env is None else env
    location = parse_store_url(url, hf_endpoint=_get(env, "HF_ENDPOINT") or DEFAULT_HF_ENDPOINT)
    if location.scheme == "file":
        from tplr.comms.stores.local import LocalStore

        assert location.root is not None
        async with LocalStore(location.root) as local:
            yield local, location.key
        return
    if location.scheme == "http":
        if access == "write":
            raise ConfigError(
                f"{url} is a read-only HTTP(S) source", hint="write to s3:// or a folder"
            )
        async with http_store_for(location, env) as http:
            yield http, location.key
        return
    assert location.bucket is not None
    config = bucket_config_for(location.bucket, access=access, endpoint_url=endpoint_url, env=env)
    reader = None
    if signed_reads and access == "read":
        reader = signed_bucket_reader(
            config, env, transfer=transfer, max_connections=max_connections
        )
    if reader is not None:
        async with reader:  # type: ignore[attr-defined]
            yield reader, location.key
        return
    from tplr.comms.stores.s3 import S3Store  # botocore: imported only when S3 is used

    async with S3Store(config, transfer, max_connections=max_connections) as s3:
        yield s3, location.key
