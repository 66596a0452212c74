"""A chunk folder, local or ``s3://``: its small JSON files, listings, and the lock of the one writer."""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_frozenbn.errors import DataError
from lightning_frozenbn.files import write_atomically

__all__ = ["LOCK", "Location", "WriterLock"]

LOCK = "lightning_frozenbn.lock"  # held by the one optimize writing a folder (local folders)


@dataclass(frozen=True)
class Location:
    """A chunk folder: a local path or ``s3://bucket/prefix`` (endpoint and keys from the environment).

    Only the small JSON files of this package go through here; litdata moves the chunks.
    """

    url: str

    @property
    def remote(self) -> bool:
        """True for ``s3://`` URLs."""
        return self.url.startswith("s3://")

    def join(self, *parts: str) -> str:
        """``url/part/...``."""
        return "/".join([self.url.rstrip("/"), *parts])

    def _bucket_key(self, name: str) -> tuple[str, str]:
        bucket, _, prefix = self.url[len("s3://") :].partition("/")
        return bucket, "/".join(p for p in (prefix.strip("/"), name) if p)

    def _client(self) -> Any:
        import boto3

        return boto3.client("s3")

    def check_reachable(self) -> None:
        """The bucket exists and answers, or a :class:`DataError` naming it (local folders: nothing to check)."""
        if not self.remote:
            return
        bucket, _ = self._bucket_key("")
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "AWS's default endpoint")
        try:
            self._client().head_bucket(Bucket=bucket)
        except Exception as err:  # botocore: ClientError (404/403), EndpointConnectionError, NoCredentialsError
            raise DataError(
                f"Bucket {bucket!r} of {self.url!r} is missing or unreachable at {endpoint}: {err}. Create the "
                "bucket, or set AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for the store."
            ) from err

    def read_json(self, name: str) -> dict[str, Any] | None:
        """The JSON file ``name`` in this folder, or None if there is none."""
        if not self.remote:
            path = Path(self.url) / name
            return json.loads(path.read_text()) if path.is_file() else None
        bucket, key = self._bucket_key(name)
        client = self._client()
        try:
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            return None
        return json.loads(body)

    def write_json(self, name: str, value: dict[str, Any]) -> None:
        """Write ``name`` whole (a local file atomically; an S3 object is whole by nature)."""
        data = (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()
        if not self.remote:
            write_atomically(Path(self.url) / name, lambda f: f.write(data))
            return
        bucket, key = self._bucket_key(name)
        self._client().put_object(Bucket=bucket, Key=key, Body=data)

    def delete(self, name: str) -> None:
        """Remove ``name`` if present."""
        if not self.remote:
            (Path(self.url) / name).unlink(missing_ok=True)
            return
        bucket, key = self._bucket_key(name)
        self._client().delete_object(Bucket=bucket, Key=key)

    def delete_folder(self, name: str) -> None:
        """Remove the sub-folder ``name`` and everything under it, if present."""
        if not self.remote:
            shutil.rmtree(Path(self.url) / name, ignore_errors=True)
            return
        bucket, _ = self._bucket_key(name)
        client = self._client()
        for page in self._pages(name):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys})

    def _pages(self, folder: str) -> Any:
        """The S3 listing of everything under the sub-folder ``folder``, page by page."""
        bucket, prefix = self._bucket_key(folder)
        return self._client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/")

    def sizes(self, folder: str) -> dict[str, int]:
        """The files directly in the sub-folder ``folder`` and their sizes in bytes (empty if none)."""
        if not self.remote:
            path = Path(self.url) / folder
            return {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()} if path.is_dir() else {}
        prefix = self._bucket_key(folder)[1].rstrip("/") + "/"
        found: dict[str, int] = {}
        for page in self._pages(folder):
            for obj in page.get("Contents", []):
                name = obj["Key"][len(prefix) :]
                if "/" not in name:
                    found[name] = int(obj["Size"])
        return found

    def entries(self) -> list[str]:
        """What the folder holds (names, first level); empty if it does not exist."""
        if not self.remote:
            path = Path(self.url)
            if path.exists() and not path.is_dir():
                raise DataError(f"output_dir {self.url!r} is a file, not a folder: choose a folder path.")
            return sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        bucket, prefix = self._bucket_key("")
        listing = self._client().list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/") + "/" if prefix else "")
        return sorted({obj["Key"][len(prefix) :].strip("/").split("/")[0] for obj in listing.get("Contents", [])})


class WriterLock:
    """The one optimize that writes a local folder: a lock file made with O_EXCL, holding host and pid.

    A lock left by a killed writer (same host, its pid gone) is taken over; one held by a live process is a
    :class:`DataError` naming it. S3 has no such primitive here: for buckets, do not run two writers at once.
    """

    def __init__(self, location: Location) -> None:
        self.path = None if location.remote else Path(location.url) / LOCK
        self.url = location.url

    def __enter__(self) -> WriterLock:
        if self.path is None or (self.path.parent.exists() and not self.path.parent.is_dir()):
            return self  # a bucket, or a file where the folder should be (refused by the checks after this)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = json.dumps({"host": socket.gethostname(), "pid": os.getpid()})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
                    self.path.unlink(missing_ok=True)  # left by a writer that was killed: take it over
                    continue
                raise DataError(
                    f"output_dir {self.url!r} is being written by another lightning-frozenbn-optimize (pid "
                    f"{holder.get('pid')} on {holder.get('host')}): wait for it to finish, or stop it and rerun."
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            return self
        raise DataError(f"Cannot take the lock {str(self.path)!r}: delete it if no optimize is running, and rerun.")

    def _holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text()) if self.path is not None else {}
        except (OSError, ValueError):
            return {}

    def __exit__(self, *exc: Any) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True
