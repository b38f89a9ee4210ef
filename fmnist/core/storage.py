"""Local disk, NFS and object storage (s3://, gs://, ...) through pyarrow.fs, one way for every path option.

Object-storage filesystems are built here with bounded connect/request timeouts and retries, so
an endpoint that does not answer is an error in seconds rather than a hang; credentials come
from the standard chain of each store (for S3: AWS_* variables, ~/.aws, the instance profile;
AWS_ENDPOINT_URL for an S3-compatible store). Their errors become one line that never
includes a secret.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import pyarrow as pa
import pyarrow.fs as pafs

from fmnist.core.errors import InputError

# An endpoint that does not answer fails after about CONNECT_TIMEOUT_S x S3_ATTEMPTS.
CONNECT_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 30.0
S3_ATTEMPTS = 3
GCS_RETRY_LIMIT = timedelta(seconds=15)
# The driver's storage settings that Ray workers need too (credentials, endpoint, region).
STORAGE_ENV_PREFIXES = ("AWS_",)
STORAGE_ENV_NAMES = ("GOOGLE_APPLICATION_CREDENTIALS",)


def is_uri(path: str) -> bool:
    return "://" in path


def check_run_name(name: str) -> None:
    """--name of a run or search: one plain directory name, in ASCII (Ray Train and Tune fail on others)."""
    if "/" in name or name in ("", ".", "..") or not name.isascii() or not name.isprintable():
        raise InputError(f"--name {name!r} must be a plain directory name in ASCII letters, digits and punctuation")


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


def storage_env_vars() -> dict[str, str]:
    """The driver's storage settings (AWS_*, ...), for Ray workers' environment."""
    return {k: v for k, v in os.environ.items() if k.startswith(STORAGE_ENV_PREFIXES) or k in STORAGE_ENV_NAMES}


def _s3_filesystem(bucket: str) -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region and not endpoint:  # as pyarrow's from_uri does: the bucket's own region
        try:
            region = pafs.resolve_s3_region(bucket)
        except (OSError, ValueError):
            region = None  # then the SDK's own guess; a wrong one fails on first use, in one line
    # pyarrow takes the endpoint's host[:port] and its scheme apart.
    scheme, _, host = (endpoint or "").rstrip("/").rpartition("://")
    return pafs.S3FileSystem(
        region=region, endpoint_override=host or None, scheme=scheme or "https",
        connect_timeout=CONNECT_TIMEOUT_S, request_timeout=REQUEST_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS),
    )


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of a URI and the path on it; s3:// and gs:// with bounded timeouts and retries."""
    scheme, _, rest = uri.partition("://")
    if "?" not in rest:  # options in a query string (region=, endpoint_override=): pyarrow's own parsing
        path = rest.rstrip("/")
        if scheme == "s3":
            return _s3_filesystem(path.split("/")[0]), path
        if scheme in ("gs", "gcs"):
            return pafs.GcsFileSystem(retry_time_limit=GCS_RETRY_LIMIT), path
    return pafs.FileSystem.from_uri(uri)


def _aws_credentials_configured() -> bool:
    """Whether any source of the AWS credential chain is set up (not whether its keys are good)."""
    if any(os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                                       "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")):
        return True
    files = (os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
             os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"))
    if any(os.path.exists(os.path.expanduser(f)) for f in files):
        return True
    return os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true"  # an instance profile may answer


def describe_error(e: OSError) -> str:
    """A storage error in one line, with what to check for the usual causes."""
    text = " ".join(str(e).split())
    if re.search(r"NETWORK_CONNECTION|Couldn't connect|Could not resolve|timed out|Timeout", text, re.I):
        return f"the storage endpoint does not answer ({text}); check AWS_ENDPOINT_URL and the network"
    if "AWS Error" in text and not _aws_credentials_configured():
        return ("no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE "
                f"(~/.aws), or run on a node with an instance profile ({text})")
    if re.search(r"ACCESS_DENIED|AccessDenied|INVALID_ACCESS_KEY|InvalidAccessKey|SIGNATURE|Forbidden|"
                 r"credentials|HTTP response code 403", text, re.I):
        return (f"access denied ({text}); check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "~/.aws, or the instance profile) and their permissions on the bucket")
    if re.search(r"NO_SUCH_BUCKET|NoSuchBucket", text):
        return f"the bucket does not exist ({text})"
    return e.strerror or text


@dataclass(frozen=True)
class StoragePath:
    """A file or directory: its filesystem, its path on that filesystem, and how to show it to a user."""

    fs: pafs.FileSystem
    path: str
    uri: str  # what Ray's storage_path and the user see: an absolute local path or a URI

    @classmethod
    def parse(cls, location: str, what: str = "storage path") -> "StoragePath":
        """``location`` as given by the user; ``what`` names it (an option) in errors."""
        if not is_uri(location):
            local = os.path.abspath(os.path.expanduser(location))
            return cls(pafs.LocalFileSystem(), local, local)
        if "@" in location.split("://", 1)[1].split("/")[0]:  # s3://KEY:SECRET@bucket: not to be printed
            raise InputError(f"{what}: keys in a URI would show in logs and errors; set AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) instead")
        try:
            fs, path = filesystem(location)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise InputError(f"{what} {location} is not usable ({' '.join(str(e).split())})") from None
        parsed = cls(fs, path.rstrip("/"), location.rstrip("/"))
        if fs.type_name in ("s3", "gcs"):  # a missing bucket or bad credentials: one line now, not a traceback later
            parsed._check_bucket(what)
        return parsed

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def child(self, name: str) -> "StoragePath":
        return StoragePath(self.fs, f"{self.path}/{name}", f"{self.uri}/{name}")

    def sibling(self, name: str) -> "StoragePath":
        """Another entry in the same directory (prefix)."""
        return StoragePath(self.fs, f"{self.path.rsplit('/', 1)[0]}/{name}", f"{self.uri.rsplit('/', 1)[0]}/{name}")

    def relative(self, path: str) -> "StoragePath":
        """The entry at ``path`` (on this filesystem) under this directory."""
        return StoragePath(self.fs, path, self.uri + path[len(self.path):])

    def holds(self, other: "StoragePath") -> bool:
        """Whether ``other`` is this path or lies under it (on the same kind of filesystem)."""
        if self.is_local != other.is_local or self.fs.type_name != other.fs.type_name:
            return False
        mine, theirs = (os.path.realpath(p.path) if p.is_local else p.path for p in (self, other))
        return theirs == mine or theirs.startswith(mine.rstrip("/") + "/")

    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def subdirectories(self) -> list[str]:
        if not self.exists():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def files(self, suffixes: tuple[str, ...]) -> list["StoragePath"]:
        """The files under this directory, at any depth, whose names end in ``suffixes``, in path order."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True))
        return sorted((self.relative(i.path) for i in infos
                       if i.type == pafs.FileType.File and i.path.lower().endswith(suffixes)), key=lambda p: p.path)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self, name: str) -> str:
        return self.child(name).read_bytes().decode()

    def write_whole(self, data: bytes) -> None:
        """Write this file whole: readers see the old or the new content, never a part. Raises OSError."""
        if self.is_local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            write_file_whole(self.path, data)
        else:  # an object store's PUT is already all-or-nothing
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)

    def write(self, name: str, data: bytes) -> None:
        """Write a file of this run directory whole (see write_whole)."""
        try:
            self.child(name).write_whole(data)
        except OSError as e:  # not writable, a file in the way, a full disk
            raise InputError(f"cannot write {self.uri}/{name} ({describe_error(e)}); "
                             "pass a --storage-path you can write to") from None

    def _check_bucket(self, what: str) -> None:
        """Fail in one line if this object-storage location's bucket is missing or out of reach."""
        bucket = self.path.split("/")[0]
        try:
            found = self.fs.get_file_info(bucket).type != pafs.FileType.NotFound
        except OSError as e:
            raise InputError(f"{what} {self.uri}: {describe_error(e)}") from None
        if not found:
            raise InputError(f"{what} {self.uri}: bucket {bucket} does not exist; create it or pass another")
