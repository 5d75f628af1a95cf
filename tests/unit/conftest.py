"""Unit-test fixtures: an in-process fake S3 (moto) for orchestrator checks that must stop before any write."""

import socket
import urllib.request

import pytest


@pytest.fixture
def moto_s3(monkeypatch):
    """A moto S3 server on a free loopback port with an empty bucket ``stamina``; env points clients at it.

    moto keeps one backend per process, shared by every server: it is reset first, so objects another
    test wrote never count for this one.
    """
    from moto.server import ThreadedMotoServer

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=30).read()
    for k, v in {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import boto3

    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    client.create_bucket(Bucket="stamina")
    yield client
    server.stop()
