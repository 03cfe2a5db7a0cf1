"""Presigned URLs made without botocore (``tplr fetch``'s fast start) sign exactly what
botocore signs: the same canonical request gives the same signature at the same moment."""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from botocore.config import Config
from pydantic import SecretStr

from tplr.comms.stores.sigv4 import object_url, presign_url


@pytest.mark.parametrize("key", ["a.bin", "dir/a b+c~.bin", "ünï/cödé=1&x?.bin", "a//b"])
@pytest.mark.parametrize(
    ("endpoint", "region"),
    [("http://127.0.0.1:9000", "us-east-1"), ("https://acct.r2.cloudflarestorage.com", "auto")],
)
def test_presigned_get_urls_match_botocore(key, endpoint, region):
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    theirs = client.generate_presigned_url(
        "get_object", Params={"Bucket": "bkt", "Key": key}, ExpiresIn=3600
    )
    their_query = parse_qs(urlsplit(theirs).query)
    moment = datetime.strptime(their_query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    ours = presign_url(
        "GET",
        object_url(endpoint, "bkt", key),
        access_key_id=SecretStr("AKIDEXAMPLE"),
        secret_access_key=SecretStr("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
        region=region,
        expires_s=3600,
        now=moment,
    )
    assert urlsplit(ours).path == urlsplit(theirs).path
    assert parse_qs(urlsplit(ours).query) == their_query


def test_the_secret_never_appears_in_the_url():
    url = presign_url(
        "HEAD",
        object_url("http://h", "b", "k"),
        access_key_id=SecretStr("AKID"),
        secret_access_key=SecretStr("the-secret"),
        region="auto",
        expires_s=60,
    )
    assert "the-secret" not in url and "X-Amz-Signature=" in url
    with pytest.raises(ValueError, match="expires_s"):
        presign_url("GET", "http://h/b/k", access_key_id=SecretStr("a"),
                    secret_access_key=SecretStr("s"), region="auto", expires_s=0)  # fmt: skip
