"""Committed outputs: a directory of data files that readers see whole, or not at all.

The protocol of Hadoop/Spark's output committers, for local disk, NFS and object storage:

    1. the data files are written under a hidden staging directory beside the output
    2. they are moved into place: locally one rename (an --overwrite'n output is swapped);
       on object storage, which has no rename, the old output's _SUCCESS is deleted first
       (from then on it reads as incomplete), then its files, then the new files are moved in
    3. _SUCCESS, a small JSON manifest (files, rows, schema, checkpoint, input), is written last

The old output is touched only once the new one is fully staged. Readers (read_committed) go
by the manifest: a directory with data but no _SUCCESS is an output that did not finish.
"""

from __future__ import annotations

import json
import shutil
import uuid

import pyarrow.fs as pafs

from fmnist.core.errors import InputError
from fmnist.core.storage import StoragePath, describe_error

MANIFEST = "_SUCCESS"


class StagedOutput:
    """``with StagedOutput(output) as staged:`` write files into ``staged.dir``, then ``staged.commit(...)``.

    Leaving the block without a commit (an error, Ctrl-C) deletes the staging directory, and
    ``output`` is as it was.
    """

    def __init__(self, output: StoragePath, option: str = "--output"):
        self.output = output
        self.option = option
        self.dir = output.sibling(f".{output.name}.incomplete-{uuid.uuid4().hex[:8]}")

    def __enter__(self) -> "StagedOutput":
        # Made now (on object storage: a probe object written), so that an output that cannot be
        # written fails before any work.
        try:
            self.dir.fs.create_dir(self.dir.path, recursive=True)
            if not self.dir.is_local:
                self.dir.child(".probe").write_whole(b"")
        except OSError as e:
            self._abort()
            raise InputError(f"cannot write {self.option} {self.output.uri} ({describe_error(e)}); "
                             "pass a directory you can write to") from None
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self._abort()

    def commit(self, rows: int, schema: list[list[str]], **details: object) -> dict:
        """Move the staged files into place and write the manifest last; returns the manifest."""
        files = [f for f in self.dir.files(("",)) if not f.name.startswith((".", "_"))]
        manifest = {"files": [f.path[len(self.dir.path) + 1:] for f in files], "rows": rows,
                    "schema": schema, **details}
        data = (json.dumps(manifest, indent=2) + "\n").encode()
        if self.dir.is_local:
            self.dir.child(MANIFEST).write_whole(data)
            self._swap_into_place()
        else:
            self._move_into_place(files, data)
        return manifest

    def _swap_into_place(self) -> None:
        """Local/NFS: one rename makes the staged directory the output (files and manifest at once)."""
        fs = self.dir.fs
        if self.output.exists():
            replaced = self.output.sibling(f".{self.output.name}.replaced-{uuid.uuid4().hex[:8]}")
            fs.move(self.output.path, replaced.path)
            fs.move(self.dir.path, self.output.path)
            _delete(replaced)
        else:
            fs.move(self.dir.path, self.output.path)

    def _move_into_place(self, files: list[StoragePath], manifest: bytes) -> None:
        """Object storage: the old output stops reading as complete before any of its files go."""
        fs = self.output.fs
        if self.output.exists():
            old_manifest = self.output.child(MANIFEST)
            if old_manifest.exists():
                fs.delete_file(old_manifest.path)
            fs.delete_dir_contents(self.output.path, missing_dir_ok=True)
        for file in files:
            fs.move(file.path, self.output.path + file.path[len(self.dir.path):])
        self.output.child(MANIFEST).write_whole(manifest)
        self._abort()  # what is left of the staging directory: the probe

    def _abort(self) -> None:
        try:
            _delete(self.dir)
        except OSError:
            pass  # best effort: a hidden staging directory that readers ignore


def _delete(location: StoragePath) -> None:
    if location.is_local:
        shutil.rmtree(location.path, ignore_errors=True)
    elif location.exists():
        location.fs.delete_dir(location.path)


def read_committed(directory: StoragePath, suffix: str) -> list[StoragePath] | None:
    """The data files of a committed output, as its manifest lists them; None where there is no manifest.

    An output with a manifest whose files are missing is refused (InputError).
    """
    manifest_file = directory.child(MANIFEST)
    try:
        manifest = json.loads(manifest_file.read_bytes())
        names = manifest["files"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{manifest_file.uri} is damaged ({e}); re-run the command that wrote it") from None
    files = [directory.child(name) for name in names if name.endswith(suffix)]
    infos = directory.fs.get_file_info([f.path for f in files])
    missing = [f.uri for f, info in zip(files, infos) if info.type != pafs.FileType.File]
    if missing:
        raise InputError(f"{directory.uri} lacks {missing[0]}, which its {MANIFEST} lists; re-run the command "
                         "that wrote it")
    return files


def incomplete(directory: StoragePath, command: str) -> InputError:
    """The error for data without a manifest."""
    return InputError(f"{directory.uri} is incomplete (no {MANIFEST}): the '{command}' that wrote it did not "
                      f"finish, or is still running; re-run it")
