"""Artifact storage: the local directory (default) or an S3-compatible store shared by replicas."""

from __future__ import annotations

from typing import Any

from control_plane.storage.blobs import BlobInfo, BlobStore, BlobWriter, LocalBlobStore, StoredBlob
from control_plane.storage.s3 import S3BlobStore, s3_client

__all__ = ["BlobInfo", "BlobStore", "BlobWriter", "LocalBlobStore", "S3BlobStore", "StoredBlob", "make_blob_store"]


def make_blob_store(settings: Any) -> LocalBlobStore:
    """The store `settings.blob_store` names; the local directory is the S3 store's scratch space."""
    if settings.blob_store == "s3":
        client = s3_client(settings.s3_endpoint_url)
        return S3BlobStore(
            settings.blob_dir, client=client, bucket=settings.s3_bucket, expiry_s=settings.s3_presign_expiry_s
        )
    return LocalBlobStore(settings.blob_dir)
