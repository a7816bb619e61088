"""The S3 test server itself: a real SeaweedFS answers the stock client, refuses a wrong key,
and keeps its buckets across a restart (what the bucket-guard tests rely on)."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError


def test_server_round_trip(s3_server: Any, s3_bucket: str) -> None:
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="a/\u00e9.jpg", Body=b"hello")
    listed = client.list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert [(o["Key"], o["Size"]) for o in listed] == [("a/\u00e9.jpg", 5)]
    assert client.get_object(Bucket=s3_bucket, Key="a/\u00e9.jpg")["Body"].read() == b"hello"


def test_wrong_key_is_refused(s3_server: Any, s3_bucket: str) -> None:
    with pytest.raises(ClientError) as caught:
        s3_server.client(secret_key="wrong").list_objects_v2(Bucket=s3_bucket)
    assert caught.value.response["Error"]["Code"] in {"SignatureDoesNotMatch", "AccessDenied"}


@pytest.mark.slow
def test_restart_keeps_buckets(own_s3_server: Any) -> None:
    bucket = own_s3_server.new_bucket()
    own_s3_server.client().put_object(Bucket=bucket, Key="k", Body=b"1")
    own_s3_server.stop()
    own_s3_server.start()
    body = own_s3_server.client().get_object(Bucket=bucket, Key="k")["Body"].read()
    assert body == b"1"
