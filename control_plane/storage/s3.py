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

from control_plane.errors import DomainError, ErrorCode
from control_plane.storage.blobs import SHA256_NAME, BlobInfo, LocalBlobStore, StoredBlob

PART_BYTES = 8 * 1024 * 1024  # multipart part size: the most of an upload in memory at once
COPY_WHOLE_BYTES = 5 * 1024**3  # CopyObject's limit; a larger object is copied in parts, inside the store
PREFIX = "blobs/sha256/"


@contextlib.contextmanager
def _reaching_the_store(bucket: str) -> Iterator[None]:
    """An unreachable or refusing store is the server's failure (503), never the client's."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (Boto3Error, BotoCoreError, ClientError) as exc:
        raise DomainError(
            ErrorCode.BLOB_STORE_UNAVAILABLE, f"the artifact store (bucket {bucket!r}) failed: {exc}"
        ) from exc


class S3BlobStore(LocalBlobStore):
    """The local store's upload path, with S3 as where committed blobs live."""

    list_page_size = 1000  # keys per ListObjectsV2 page (the S3 maximum)

    def __init__(self, root: Path, *, client: Any, bucket: str, expiry_s: int = 900) -> None:
        super().__init__(root)
        self.client = client
        self.bucket = bucket
        self.expiry_s = expiry_s

    def stat(self, sha256: str) -> BlobInfo | None:
        from botocore.exceptions import ClientError

        with _reaching_the_store(self.bucket):
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=self.key_for(sha256))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                    return None
                raise
        return BlobInfo(sha256, int(head["ContentLength"]), head["LastModified"].timestamp())

    def exists(self, sha256: str) -> bool:
        return self.stat(sha256) is not None

    def list_blobs(self) -> Iterator[BlobInfo]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=PREFIX, PaginationConfig={"PageSize": self.list_page_size}
        )
        with _reaching_the_store(self.bucket):
            for page in pages:
                for item in page.get("Contents", []):
                    name = item["Key"][len(PREFIX) :]
                    if SHA256_NAME.fullmatch(name):
                        yield BlobInfo(name, int(item["Size"]), item["LastModified"].timestamp())

    def delete(self, sha256: str) -> None:
        with _reaching_the_store(self.bucket):
            self.client.delete_object(Bucket=self.bucket, Key=self.key_for(sha256))
        super().delete(sha256)  # the scratch copy, if this replica fetched one

    def adopt(self, temp_path: Path, sha256: str, size: int) -> StoredBlob:
        key = self.key_for(sha256)
        found = self.stat(sha256)
        if found is not None and found.size_bytes == size:
            temp_path.unlink(missing_ok=True)
            self._refresh(key)
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

    def _refresh(self, key: str) -> None:
        """Copy the object onto itself: a fresh LastModified restarts garbage collection's grace period."""
        from boto3.s3.transfer import TransferConfig

        parts = TransferConfig(multipart_threshold=COPY_WHOLE_BYTES, multipart_chunksize=COPY_WHOLE_BYTES // 5)
        source = {"Bucket": self.bucket, "Key": key}
        extra = {"MetadataDirective": "REPLACE", "ContentType": "application/octet-stream"}
        with _reaching_the_store(self.bucket):
            self.client.copy(source, self.bucket, key, ExtraArgs=extra, Config=parts)

    def path_for(self, sha256: str) -> Path:
        """A local copy (quantization reads a file), fetched into the scratch directory once."""
        local = self.local_file(sha256)
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
