"""A real S3 API on the loopback interface for the object-store tests: moto's server mode.

``s3_server`` (session-scoped) starts ``moto.server.ThreadedMotoServer`` on a free port of
127.0.0.1, creates one bucket and stops the server when the session ends; tests take their own
prefix inside the bucket (:meth:`S3Server.url`), so they never see each other's objects.
boto3 (installed with moto) is used only to create the bucket and to inspect what the backend
cannot see (incomplete multipart uploads).
"""
from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

BUCKET = "deltackpt-test"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
REGION = "us-east-1"
#: obstore's retries for tests that inject faults: 3 retries, 10-100 ms apart, 10 s at most
FAST_RETRY: dict[str, Any] = {
    "max_retries": 3,
    "retry_timeout": timedelta(seconds=10),
    "backoff": {"init_backoff": timedelta(milliseconds=10),
                "max_backoff": timedelta(milliseconds=100), "base": 2},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    endpoint: str
    bucket: str = BUCKET

    @property
    def storage_options(self) -> dict[str, Any]:
        """obstore options for this server (plain HTTP is allowed for an http:// endpoint)."""
        return {"endpoint_url": self.endpoint, "region": REGION, **CREDENTIALS}

    def options_via(self, endpoint: str) -> dict[str, Any]:
        """obstore options that reach this server through ``endpoint`` (a proxy), with
        :data:`FAST_RETRY`."""
        return {**self.storage_options, "endpoint_url": endpoint, "retry_config": FAST_RETRY}

    def url(self, name: str = "t") -> str:
        """A fresh, empty prefix of the bucket: ``s3://bucket/<name>-<random>``."""
        return f"s3://{self.bucket}/{name}-{uuid.uuid4().hex[:12]}"

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, **CREDENTIALS)

    def multipart_uploads(self, prefix: str) -> list[dict[str, Any]]:
        """Incomplete multipart uploads under ``prefix`` (a key prefix, no bucket)."""
        got = self.client().list_multipart_uploads(Bucket=self.bucket, Prefix=prefix)
        return list(got.get("Uploads", []))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        info = S3Server(f"http://127.0.0.1:{port}")
        info.client().create_bucket(Bucket=info.bucket)
        yield info
    finally:
        server.stop()
