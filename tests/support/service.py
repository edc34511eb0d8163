"""An AssetService wired to a MemoryFetcher and a Store in a temp dir, for unit tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from assetd.config import Config, load_config
from assetd.fetcher.memory import MemoryFetcher
from assetd.service import AssetService
from assetd.store import Store


def config_for(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    """Defaults with the cache under ``tmp_path``, each section's keys replaced as given."""
    cfg = load_config(env={"ASSETD_CACHE_DIR": str(tmp_path / "cache")})
    for name, changes in sections.items():
        cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **changes)})
    return cfg


class Env:
    """A service wired to a MemoryFetcher and a Store in a temp dir."""

    def __init__(
        self,
        tmp_path: Path,
        fetcher: MemoryFetcher | None = None,
        store_cls: type[Store] = Store,
        **sections: dict[str, Any],
    ) -> None:
        self.config = config_for(tmp_path, **sections)
        self.fetcher = fetcher or MemoryFetcher()
        self.store = store_cls(self.config.cache.dir)
        self.service = AssetService(self.config, self.fetcher, self.store)

    def close(self) -> None:
        self.service.close()
        self.store.close()
