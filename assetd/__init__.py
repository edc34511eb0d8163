"""assetd: a host daemon that caches S3 assets for autograder sandboxes."""

from assetd.errors import AssetError
from assetd.service import AssetService, Resolved

__all__ = ["AssetError", "AssetService", "Resolved", "__version__"]
__version__ = "0.1.0"
