"""Artifact storage. `BlobStore` is the seam for S3-compatible stores later."""

from control_plane.storage.blobs import BlobStore, BlobWriter, LocalBlobStore, StoredBlob

__all__ = ["BlobStore", "BlobWriter", "LocalBlobStore", "StoredBlob"]
