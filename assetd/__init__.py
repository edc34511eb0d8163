"""assetd: a host daemon that caches S3 assets for autograder sandboxes.

The public surface is small: :class:`AssetdClient` to talk to the daemon,
:class:`Resolved` for its answers, and :class:`AssetError` (see
:mod:`assetd.errors` for the whole tree). Importing this package pulls in
neither boto3 nor the cache.
"""

import logging

from assetd.client import AssetdClient
from assetd.errors import AssetError
from assetd.protocol import Resolved

__all__ = ["AssetError", "AssetdClient", "Resolved", "__version__"]
__version__ = "0.1.0"

# A library: silent unless the host application configures logging.
logging.getLogger(__name__).addHandler(logging.NullHandler())
