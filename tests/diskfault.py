"""Real disk faults for the spool's tests: a size-limited tmpfs filled until ENOSPC and
freed again, a block device whose writes fail at fsync, and the append-only attribute
that makes the kernel refuse ftruncate. No mocks: the kernel says no.

Mounting needs root (CI runs as root); without it the tests skip, saying why."""

from __future__ import annotations

import array
import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

# linux/fs.h: the inode flags ioctls and the append-only flag (chattr +a).
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_APPEND_FL = 0x00000020


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)


def _unmount(mountpoint: Path) -> None:
    if _run("umount", str(mountpoint)).returncode != 0:
        # Something still holds it (a failed test's open fd): detach it anyway, so no
        # mount outlives the test.
        _run("umount", "-l", str(mountpoint))


@contextmanager
def small_tmpfs(mountpoint: Path, size: str = "2m", inodes: int | None = None) -> Iterator[Path]:
    """A tmpfs of ``size`` (and at most ``inodes`` files) at ``mountpoint``."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root (CI runs as root)")
    mountpoint.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
    mounted = _run("mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mountpoint))
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        _unmount(mountpoint)


@contextmanager
def fsync_failing_disk(workdir: Path) -> Iterator[tuple[Path, Path]]:
    """An ext2 file system on a loop device whose backing file is sparse on a small
    tmpfs. Fill the tmpfs (yielded second) and the file system (yielded first) still
    takes write() into its page cache, but the block writes at fsync fail: the loop
    device cannot store them (the kernel reports ENOSPC, as thin-provisioned storage
    does). Free the tmpfs and the device works again."""
    for tool in ("losetup", "mkfs.ext2"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    with small_tmpfs(workdir / "backing", size="4m") as backing:
        image = backing / "disk.img"
        with image.open("wb") as f:
            f.truncate(16 * 1024 * 1024)  # sparse: blocks are taken as they are written
        made = _run("mkfs.ext2", "-q", "-F", str(image))
        assert made.returncode == 0, made.stderr
        attached = _run("losetup", "-f", "--show", str(image))
        if attached.returncode != 0:
            pytest.skip(f"no loop device: {attached.stderr.strip()}")
        device = attached.stdout.strip()
        try:
            mountpoint = workdir / "disk"
            mountpoint.mkdir()
            mounted = _run("mount", "-t", "ext2", "-o", "errors=continue", device, str(mountpoint))
            assert mounted.returncode == 0, mounted.stderr
            try:
                yield mountpoint, backing
            finally:
                _unmount(mountpoint)
        finally:
            _run("losetup", "-d", device)


def fill(directory: Path) -> Path:
    """Write a filler file in ``directory`` until the file system says ENOSPC."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    block = b"\0" * 65536
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError:
                # The last few pages: smaller writes take what is left.
                if len(block) == 1:
                    break
                block = block[: len(block) // 16 or 1]
    finally:
        os.close(fd)
    return filler


def use_up_inodes(directory: Path) -> list[Path]:
    """Create empty files in ``directory`` until the file system has no inode left."""
    made: list[Path] = []
    while True:
        path = directory / f"inode-{len(made)}"
        try:
            path.touch()
        except OSError:
            return made
        made.append(path)


def set_append_only(path: Path, on: bool) -> None:
    """``chattr +a`` / ``-a``: the kernel then refuses to truncate the file (EPERM)
    while appends through an O_APPEND descriptor still work."""
    fd = os.open(path, os.O_RDONLY)
    try:
        flags = array.array("l", [0])
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags, True)
        flags[0] = flags[0] | FS_APPEND_FL if on else flags[0] & ~FS_APPEND_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags, True)
    finally:
        os.close(fd)


@contextmanager
def append_only(path: Path) -> Iterator[None]:
    set_append_only(path, True)
    try:
        yield
    finally:
        with suppress(OSError):
            set_append_only(path, False)
