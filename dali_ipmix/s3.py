"""``s3://bucket/prefix`` locations: one listing per run, object reads, and the storage errors.

DALI reads ``s3://`` URIs itself (the AWS SDK is in its wheel) with the usual AWS environment:
``AWS_ENDPOINT_URL`` (an S3-compatible store), ``AWS_PROFILE``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``, credentials from the environment or ``~/.aws``.  The listing is done here
with boto3 instead, which reads the same environment: it bounds the time spent on an unreachable
endpoint (``CONNECT_TIMEOUT`` x ``RETRIES``), tells a missing bucket from a denied one and from
missing credentials (each a one-line ``UserError`` before any work), and hands the keys to the
data source, so DALI's readers get an explicit file list and never list the bucket again.
"""
from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, Tuple

from .errors import UserError

CONNECT_TIMEOUT = 5     # seconds per attempt to reach the endpoint
READ_TIMEOUT = 30
PARALLEL_READS = 16     # the parallel reads of many small objects or ranges (threads)
MAX_CONNECTIONS = 64    # a client's connection pool: what threads of one process may use at once
RETRIES = 2             # attempts in all: an unreachable endpoint fails within ~CONNECT_TIMEOUT x RETRIES


def is_s3(location) -> bool:
    return str(location).startswith("s3://")


def split(uri: str) -> Tuple[str, str]:
    """``s3://bucket/a/b/`` -> ("bucket", "a/b") (no slashes at the ends of the prefix)."""
    bucket, _, prefix = str(uri)[len("s3://"):].partition("/")
    return bucket, prefix.strip("/")


def join(uri: str, rel: str) -> str:
    return str(uri).rstrip("/") + "/" + rel


def _client():
    env = tuple(os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_REGION",
                                              "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
                                              "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                                              "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"))
    # one per process too: a client's connections must not be shared with a forked DataLoader worker
    return _client_for(env + (os.getpid(),))


@functools.lru_cache(maxsize=4)
def _client_for(env):
    """One client per AWS environment (the index files of a shard set are read with one)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise UserError("s3:// data needs boto3: pip install 'dali_ipmix[s3]'") from None
    config = Config(connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT,
                    retries={"max_attempts": RETRIES, "mode": "standard"},
                    max_pool_connections=MAX_CONNECTIONS)
    try:
        session = boto3.session.Session()
        return session.client("s3", config=config,
                              endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
    except Exception as e:      # botocore's ProfileNotFound, a bad region name...
        raise UserError(f"S3 client: {e}; check AWS_PROFILE / AWS_REGION / AWS_ENDPOINT_URL") from None


def _explain(e: Exception, flag: str, uri: str) -> UserError:
    """One line for what boto3 raised while reaching ``uri``."""
    from botocore import exceptions as bx
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "the AWS endpoint"
    if isinstance(e, bx.NoCredentialsError):
        return UserError(f"{flag} {uri}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                         f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with a profile in ~/.aws/credentials")
    if isinstance(e, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError,
                      bx.ConnectionClosedError)):
        return UserError(f"{flag} {uri}: cannot reach {endpoint} (gave up after {RETRIES} attempts of "
                         f"{CONNECT_TIMEOUT} s); check AWS_ENDPOINT_URL and the network")
    if isinstance(e, bx.ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        bucket = split(uri)[0]
        if code in ("NoSuchBucket",):
            return UserError(f"{flag} {uri}: bucket {bucket} does not exist at {endpoint}; check the "
                             f"bucket name and AWS_ENDPOINT_URL / AWS_REGION")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403",
                    "AllAccessDisabled", "ExpiredToken", "InvalidToken"):
            return UserError(f"{flag} {uri}: access denied ({code}); check the credentials "
                             f"(AWS_ACCESS_KEY_ID / AWS_PROFILE) and the bucket's permissions")
        return UserError(f"{flag} {uri}: S3 error {code or type(e).__name__}: "
                         f"{e.response.get('Error', {}).get('Message', '')}")
    if isinstance(e, bx.BotoCoreError):
        return UserError(f"{flag} {uri}: S3 error: {e}")
    raise e


@dataclass(frozen=True)
class Listing:
    """Every object under ``uri`` (one listing, done once per run): key relative to the prefix -> size."""
    uri: str
    objects: Dict[str, int]

    def by_prefix(self, depth: int) -> Dict[str, "Listing"]:
        """This listing cut into its sub-prefixes ``depth`` levels down (``{"a/b": listing of
        a/b/}``), in one pass over the keys: nested data sets (ImageNet-C's
        ``<corruption>/<severity>/``) are listed once, as a whole."""
        out: Dict[str, Dict[str, int]] = {}
        for key, size in self.objects.items():
            parts = key.split("/", depth)
            if len(parts) > depth:
                out.setdefault("/".join(parts[:depth]), {})[parts[depth]] = size
        return {rel: Listing(join(self.uri, rel), objects) for rel, objects in out.items()}


def list_prefix(uri: str, flag: str = "--data") -> Listing:
    """All objects under ``s3://bucket/prefix/``; a missing bucket, an empty prefix, missing
    credentials, a denied access or an unreachable endpoint is a one-line ``UserError``."""
    bucket, prefix = split(uri)
    if not bucket:
        raise UserError(f"{flag} {uri}: no bucket named; give s3://BUCKET/PREFIX")
    start = prefix + "/" if prefix else ""
    objects: Dict[str, int] = {}
    try:
        pages = _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start)
        for page in pages:
            for obj in page.get("Contents", ()):
                objects[obj["Key"][len(start):]] = int(obj["Size"])
    except UserError:
        raise
    except Exception as e:
        raise _explain(e, flag, uri) from None
    if not objects:
        raise UserError(f"{flag} {uri}: no objects under prefix {start or '/'} in bucket {bucket}; "
                        f"check the prefix (upload the class folders or `dali-ipmix shard` output there)")
    return Listing(str(uri).rstrip("/"), objects)


def read_object(uri: str, flag: str = "--data", byte_range: str = None) -> bytes:
    """The bytes of one object (``byte_range`` as in HTTP, e.g. ``"bytes=0-63"``)."""
    bucket, key = split(uri)
    try:
        kw = {"Range": byte_range} if byte_range else {}
        return _client().get_object(Bucket=bucket, Key=key, **kw)["Body"].read()
    except Exception as e:
        raise _explain(e, flag, uri) from None


class _Stream:
    """An object's body as a file to read once, front to back (``tarfile``'s stream mode);
    the storage's errors met while reading become the one-line ``UserError``."""

    def __init__(self, body, uri: str, flag: str):
        self.body, self.uri, self.flag = body, uri, flag

    def read(self, size: int = -1) -> bytes:
        try:
            return self.body.read(None if size is None or size < 0 else size)
        except Exception as e:
            raise _explain(e, self.flag, self.uri) from None

    def close(self):
        self.body.close()


def open_object(uri: str, flag: str = "--data") -> _Stream:
    """One object to read as a stream (a whole shard checked without holding it in memory)."""
    bucket, key = split(uri)
    try:
        return _Stream(_client().get_object(Bucket=bucket, Key=key)["Body"], uri, flag)
    except Exception as e:
        raise _explain(e, flag, uri) from None


@contextlib.contextmanager
def loopback_server(**env):
    """A real S3-compatible server (``moto_server``, from the test extra) as a process on a free
    port of 127.0.0.1; yields its endpoint URL and stops it however the block ends (tests,
    benchmarks).  ``env``: extra environment of the server (e.g. ``INITIAL_NO_AUTH_ACTION_COUNT="0"``:
    check keys)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, **env))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start (pip install 'moto[server]')")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def upload_tree(local, uri: str, endpoint: str) -> None:
    """Every file under the folder ``local`` to ``uri`` (tests, benchmarks; the bucket is made)."""
    import boto3
    bucket, prefix = split(uri)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    for folder, _, names in os.walk(local):
        for name in names:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, local).replace(os.sep, "/")
            client.upload_file(path, bucket, f"{prefix}/{rel}" if prefix else rel)
