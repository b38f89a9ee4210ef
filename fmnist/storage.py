"""Run directories on local disk, NFS, or object storage (s3://, gs://), through pyarrow.fs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from fmnist.errors import InputError


def is_uri(path: str) -> bool:
    return "://" in path


def write_file_whole(path: str | os.PathLike, data: bytes) -> None:
    """Write a local file so that readers (or a crash) see the old or the new content, never a part.

    Through a temporary file beside it, renamed over it; raises OSError.
    """
    directory, name = os.path.split(os.fspath(path))
    tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@dataclass(frozen=True)
class StoragePath:
    """A directory: its filesystem, its path on that filesystem, and how to show it to a user."""

    fs: pafs.FileSystem
    path: str
    uri: str  # what Ray's storage_path and the user see: an absolute local path or a URI

    @classmethod
    def parse(cls, location: str) -> "StoragePath":
        if not is_uri(location):
            local = os.path.abspath(os.path.expanduser(location))
            return cls(pafs.LocalFileSystem(), local, local)
        try:
            fs, path = pafs.FileSystem.from_uri(location)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise InputError(f"storage path {location} is not usable ({e})") from None
        return cls(fs, path.rstrip("/"), location.rstrip("/"))

    def child(self, name: str) -> "StoragePath":
        return StoragePath(self.fs, f"{self.path}/{name}", f"{self.uri}/{name}")

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.File

    def subdirectories(self) -> list[str]:
        if not self.exists():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def read_text(self, name: str) -> str:
        with self.fs.open_input_stream(f"{self.path}/{name}") as f:
            return f.read().decode()

    def write(self, name: str, data: bytes) -> None:
        """Write a file whole: readers see the old or the new content, never a part."""
        target = f"{self.path}/{name}"
        try:
            self.fs.create_dir(self.path, recursive=True)
            if isinstance(self.fs, pafs.LocalFileSystem):
                write_file_whole(target, data)
            else:  # an object store's PUT is already all-or-nothing
                with self.fs.open_output_stream(target) as f:
                    f.write(data)
        except OSError as e:  # not writable, a file in the way, a full disk
            raise InputError(f"cannot write {self.uri}/{name} ({e.strerror or e}); "
                             "pass a --storage-path you can write to") from None
