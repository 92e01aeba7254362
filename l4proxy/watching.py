"""``--watch-config``: reload when the config file, or a file it names, changes on disk.

What changes on disk is learned from the kernel (inotify, through ``watchfiles``'
Rust backend, ``RustNotify``, waited for in a worker thread), never by polling. Its
own ``awatch`` (anyio, so it would run on trio) is not used: it gives no way to know
when the watch is in place, and a change between reading the files and that moment
would go unseen. The *directories* holding the
files are watched, not the files: a Kubernetes ConfigMap or Secret volume, and
cert-manager, update by writing a new directory and swapping a ``..data`` symlink, an
event a watch on the old file would never see; editors and ``mv`` replace files the
same way. An event is only a hint: each batch of events (``watchfiles`` debounces them)
leads to a fingerprint of the watched files' *contents* (read through symlinks, in a
worker thread), and only a changed fingerprint reloads. So a log file written in the
same directory costs a hash of a few small files per batch, never a reload, and one
edit that touches a file three times reloads once.

After each reload the set of files is worked out again from the configuration then
running (a new certificate path is watched from then on).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import trio
from watchfiles._rust_notify import RustNotify  # documented: watchfiles' Rust backend API

from .configkeys import METADATA
from .configkinds import File

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

    from .config import Config

LOGGER = logging.getLogger("l4proxy.watch")

#: The watcher's wait for more events before it reports a batch (ms): an editor's save
#: or a symlink swap is one batch; how often its thread looks at its stop event (ms);
#: and how long one wait in that thread lasts before it is simply begun again (ms).
DEBOUNCE_MS = 300
#: After a failure to set up the watch: the first wait before trying again, and the most
#: it doubles to (seconds).
BACKOFF_MIN = 1.0
BACKOFF_MAX = 60.0
STEP_MS = 50
WAIT_MS = 600_000

Fingerprint = dict[str, bytes | None]


def files_named(config: Config) -> set[str]:
    """Every input file ``config`` names (certificates, keys, CA files), found through
    the config classes' key metadata: a new file-valued key is watched without a
    change here. Output files (``access_log``) are not inputs."""
    found: set[str] = set()

    def visit(value: object) -> None:
        if isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
            return
        cls = type(value)
        if not attrs.has(cls):
            return
        for field in attrs.fields(cls):
            spec = field.metadata.get(METADATA)
            item = getattr(value, field.name)
            if spec is not None and isinstance(spec.kind, File) and not spec.kind.dash:
                if isinstance(item, str):
                    found.add(item)
            else:
                visit(item)

    visit(config)
    return found


def fingerprint(paths: Iterable[str]) -> Fingerprint:
    """Each file's content digest (``None``: cannot be read now). Blocking: run it in a
    worker thread."""
    prints: Fingerprint = {}
    for path in paths:
        try:
            with open(path, "rb") as file:
                prints[path] = hashlib.blake2b(file.read(), digest_size=16).digest()
        except OSError:
            prints[path] = None
    return prints


async def watch_config(
    config_path: str,
    current: Callable[[], Config],
    reload: Callable[[str], Awaitable[None]],
) -> None:
    """Call ``reload(why)`` whenever the content of ``config_path`` or of a file
    ``current()`` names changes; runs until cancelled.

    ``reload`` does what SIGHUP does (and logs a failure, starting with ``why``); the
    files are worked out again from ``current()`` after each call.
    """
    applied: Fingerprint = {}  # what the last reload was started by
    backoff = 0.0
    while True:
        try:
            paths, directories, watcher, before = await trio.to_thread.run_sync(
                _look, config_path, current()
            )
        except Exception as exc:  # inotify limits, a directory that vanished, ...
            backoff = min(BACKOFF_MAX, max(BACKOFF_MIN, 2 * backoff))
            LOGGER.error("cannot watch the configuration: %s; trying again in %gs", exc, backoff)
            await trio.sleep(backoff)
            continue
        backoff = 0.0
        # A change while the last reload ran (a second save, a key written after its
        # certificate) is in ``before`` but was perhaps not read by that reload.
        changed = [p for p in paths if p in applied and before.get(p) != applied[p]]
        if not changed:
            try:
                with watcher:
                    LOGGER.info("watching %d files in %s", len(paths), ", ".join(directories))
                    after = before
                    while after == before:
                        await _next_batch(watcher)
                        after = await trio.to_thread.run_sync(fingerprint, paths)
            except Exception as exc:  # the watcher failed: set it up again
                LOGGER.error("watching the configuration failed: %s; watching again", exc)
                await trio.sleep(BACKOFF_MIN)
                continue
            changed = [path for path in paths if after.get(path) != before.get(path)]
            before = after
        else:
            watcher.close()
        applied = before
        LOGGER.info("%s changed: reloading", ", ".join(changed))
        await reload("--watch-config")  # then watch what the config names now


def _look(config_path: str, config: Config) -> tuple[list[str], list[str], RustNotify, Fingerprint]:
    """The files to watch (absolute), their directories, the watch on those, and the
    files' fingerprint, taken after the watch started: a change in between is seen."""
    paths = sorted(
        {os.path.abspath(config_path)} | {os.path.abspath(p) for p in files_named(config)}
    )
    directories = sorted({str(Path(p).parent) for p in paths if Path(p).parent.is_dir()})
    watcher = RustNotify(directories, False, False, 300, False, True)
    return paths, directories, watcher, fingerprint(paths)


async def _next_batch(watcher: RustNotify) -> None:
    """Wait for the next batch of changes.

    The watcher waits for the kernel in a thread that trio cannot interrupt; it
    returns within a step once its stop event is set. A sibling task sets that event
    when this is cancelled, so a drain or Ctrl-C never waits for the watcher.
    """
    stop = threading.Event()

    async def stop_when_cancelled() -> None:
        try:
            await trio.sleep_forever()
        finally:
            stop.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_when_cancelled)
        while True:
            result = await trio.to_thread.run_sync(
                watcher.watch, DEBOUNCE_MS, STEP_MS, WAIT_MS, stop
            )
            if result != "timeout":
                break  # a batch, or stopped (then the cancellation is raised on exit)
        nursery.cancel_scope.cancel()
