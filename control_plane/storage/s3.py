"""Artifacts in an S3-compatible store (AWS S3, MinIO, Ceph RGW): `<bucket>/blobs/sha256/<hex>`.

Every replica of the control plane sees the same objects, so an upload through one is
downloadable through all. An upload is received as by the local store (hashed and size-checked
into this replica's scratch directory, where it is verified and sniffed before anything is
published), then sent with a multipart upload read from that file one part at a time: only
verified content is ever written under its sha256 key, and no upload is held in memory whole.

Devices do not download through a replica: the artifact route answers 307 to a presigned GET URL
that lives `expiry_s` (see control_plane/api/routes/artifacts.py), and the agent follows it under
the redirect rules of shared/references.py (https, a private host only when allowed).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from control_plane.errors import DomainError
from control_plane.storage.blobs import LocalBlobStore, StoredBlob

PART_BYTES = 8 * 1024 * 1024  # multipart part size: the most of an upload in memory at once


@contextlib.contextmanager
def _reaching_the_store(bucket: str) -> Iterator[None]:
    """An unreachable or refusing store is the server's failure (503), never the client's."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (Boto3Error, BotoCoreError, ClientError) as exc:
        raise DomainError("blob_store_unavailable", f"the artifact store (bucket {bucket!r}) failed: {exc}") from exc


class S3BlobStore(LocalBlobStore):
    """The local store's upload path, with S3 as where committed blobs live."""

    def __init__(self, root: Path, *, client: Any, bucket: str, expiry_s: int = 900) -> None:
        super().__init__(root)
        self.client = client
        self.bucket = bucket
        self.expiry_s = expiry_s

    def _size(self, sha256: str) -> int | None:
        from botocore.exceptions import ClientError

        with _reaching_the_store(self.bucket):
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=self.key_for(sha256))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                    return None
                raise
        return int(head["ContentLength"])

    def exists(self, sha256: str) -> bool:
        return self._size(sha256) is not None

    def adopt(self, temp_path: Path, sha256: str, size: int) -> StoredBlob:
        key = self.key_for(sha256)
        if self._size(sha256) == size:
            temp_path.unlink(missing_ok=True)
            return StoredBlob(sha256, size, key, deduplicated=True)
        from boto3.s3.transfer import TransferConfig

        parts = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, max_concurrency=4)
        try:
            with _reaching_the_store(self.bucket):
                extra = {"ContentType": "application/octet-stream"}
                self.client.upload_file(str(temp_path), self.bucket, key, Config=parts, ExtraArgs=extra)
        finally:
            temp_path.unlink(missing_ok=True)
        return StoredBlob(sha256, size, key, deduplicated=False)

    def path_for(self, sha256: str) -> Path:
        """A local copy (quantization reads a file), fetched into the scratch directory once."""
        local = super().path_for(sha256)
        if not local.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="fetch-", dir=local.parent)
            os.close(fd)
            try:
                with _reaching_the_store(self.bucket):
                    self.client.download_file(self.bucket, self.key_for(sha256), name)
                os.replace(name, local)
            finally:
                Path(name).unlink(missing_ok=True)
        return local

    def download_url(self, sha256: str) -> str | None:
        return str(
            self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self.key_for(sha256)}, ExpiresIn=self.expiry_s
            )
        )


def s3_client(endpoint_url: str | None) -> Any:
    """A boto3 S3 client; credentials and region come from the standard AWS_* variables and files."""
    import boto3
    from botocore.config import Config

    # Path-style addressing for a custom endpoint: MinIO and most others do not serve bucket subdomains.
    style = "path" if endpoint_url else "auto"
    config = Config(signature_version="s3v4", s3={"addressing_style": style}, retries={"mode": "standard"})
    return boto3.client("s3", endpoint_url=endpoint_url, config=config)
