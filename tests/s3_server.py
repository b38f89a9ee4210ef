"""A real S3 API on 127.0.0.1 for the tests: moto's server mode, as Ray tests its own S3 paths."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from threading import Thread

import boto3
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


class S3Client:
    """boto3 on an S3 endpoint, for what the tests set up and look at."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.env = {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def new_bucket(self) -> str:
        name = f"fmnist-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def get(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()


class S3Server(S3Client):
    """moto on a free port in this process; ``env`` is what a client (the driver, Ray's workers) needs.

    ``write_delay_s`` slows every request that changes objects, as a distant store would: it
    widens the moments between the steps of a commit, so that a test can land a kill in them.
    """

    def __init__(self, write_delay_s: float = 0.0):
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
        app = DomainDispatcherApplication(create_backend_app)

        def slowed(environ, start_response):
            if environ["REQUEST_METHOD"] in ("PUT", "POST", "DELETE"):
                time.sleep(write_delay_s)
            return app(environ, start_response)

        self._server = make_server("127.0.0.1", 0, slowed if write_delay_s else app, threaded=True,
                                   request_handler=MotoRequestHandler)
        self._thread = Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        host, port = self._server.server_address[:2]
        super().__init__(f"http://{host}:{port}")

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()


class AuthenticatingS3Server(S3Client):
    """moto in its own process, checking credentials (moto's INITIAL_NO_AUTH_ACTION_COUNT): keys it
    never issued are refused. A bucket ``bucket`` exists. Stop it to have an endpoint that does not answer."""

    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # The first request (creating the bucket below) goes unchecked, the rest are checked.
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "1"}
        self._process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        super().__init__(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and self._process.poll() is None, "moto server did not start"
                time.sleep(0.1)
        self.bucket = self.new_bucket()

    def stop(self) -> None:
        self._process.kill()
        self._process.wait()
