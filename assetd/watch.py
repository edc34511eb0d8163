"""watchdog observers: blobs changed behind the cache's back, the config and catalog files.

- ``blobs/``: a blob deleted, modified or moved away is checked against its
  index row at once (``Store.check_blob``); a changed one is quarantined,
  so it is fetched again rather than served. The stat check on every hit
  remains the guarantee; this makes it visible as it happens.
- the config file, and the asset catalog file: a change triggers the same
  reload as SIGHUP.

Both watches subscribe only to events that can change or remove a file
(delete, move, attribute change, write, close after write): opening and
reading a blob, which student code may do in a loop through its bind
mount, generates no inotify event at all, so it costs the daemon nothing.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from assetd.log import get_logger
from assetd.store import Store

__all__ = ["Watcher"]

log = get_logger("assetd.watch")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_DEBOUNCE_S = 0.3
# no FileOpenedEvent / FileClosedNoWriteEvent: those are reads (IN_OPEN, IN_CLOSE_NOWRITE)
BLOB_EVENTS: list[type[FileSystemEvent]] = [
    FileDeletedEvent,
    FileMovedEvent,
    FileModifiedEvent,  # subscribes IN_MODIFY and IN_ATTRIB
    FileAttribEvent,  # chmod, chown, touch: the stat fingerprint changes
    FileClosedEvent,  # IN_CLOSE_WRITE only
]
CONFIG_EVENTS: list[type[FileSystemEvent]] = [*BLOB_EVENTS, FileCreatedEvent]


class _BlobHandler(FileSystemEventHandler):
    def __init__(self, store: Store) -> None:
        self.store = store
        self.events = 0  # callbacks received, for stats and tests

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.events += 1
        if event.is_directory or event.event_type not in (
            "deleted",
            "modified",
            "moved",
            "closed",
            "attrib",
        ):
            return
        name = os.path.basename(os.fsdecode(event.src_path))
        if _SHA.match(name):
            try:
                self.store.check_blob(name)
            except Exception:  # the watcher thread must survive anything
                log.exception("blob check failed", sha256=name)


class _ConfigHandler(FileSystemEventHandler):
    """Reload when the config file changes; editors replace files, so watch its directory."""

    def __init__(self, path: Path, reload: Callable[[], None]) -> None:
        self.path = os.path.realpath(path)
        self.reload = reload
        self._timer: threading.Timer | None = None

    def on_any_event(self, event: FileSystemEvent) -> None:
        paths = {os.fsdecode(event.src_path), os.fsdecode(getattr(event, "dest_path", "") or "")}
        if self.path not in {os.path.realpath(p) for p in paths if p}:
            return
        if event.event_type not in ("modified", "created", "moved", "closed"):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(_DEBOUNCE_S, self.reload)  # one reload per burst of writes
        self._timer.daemon = True
        self._timer.start()


class Watcher:
    """One observer thread for both watches."""

    def __init__(self, store: Store, config_path: str | None, reload: Callable[[], None]) -> None:
        self.observer = Observer()
        self.observer.daemon = True
        self.blob_handler = _BlobHandler(store)
        self.observer.schedule(
            self.blob_handler, str(store.blobs), recursive=True, event_filter=BLOB_EVENTS
        )
        self._files: set[str] = set()
        if config_path:
            self.watch_file(config_path, reload)

    def watch_file(self, file: str, reload: Callable[[], None]) -> None:
        """Call ``reload`` when ``file`` is saved (once per file; safe while running)."""
        path = Path(os.path.realpath(file))
        if str(path) in self._files:
            return
        self._files.add(str(path))
        try:
            self.observer.schedule(
                _ConfigHandler(path, reload),
                str(path.parent),
                recursive=False,
                event_filter=CONFIG_EVENTS,
            )
        except OSError as exc:  # a missing directory: SIGHUP still reloads
            log.warning("cannot watch file", file=str(path), error=str(exc))

    def start(self) -> None:
        self.observer.start()

    def alive(self) -> bool:
        return self.observer.is_alive()

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(5)
