"""Fetchers: how bytes get from an object store into a staged blob."""

from assetd.fetcher.base import BlobSink, Fetched, Fetcher, ObjectMeta

__all__ = ["BlobSink", "Fetched", "Fetcher", "ObjectMeta"]
