"""Results in S3-compatible object storage (AWS S3, MinIO, Ceph RGW, R2, ...), through boto3.

`STORAGE_URL=s3://bucket/prefix`; a job's files are the objects `<prefix>/jobs/<job_id>/<file>`.
The endpoint, region and credentials come from the usual environment variables, read by boto3's
own chain: `AWS_ENDPOINT_URL` (or `S3_ENDPOINT_URL`; unset means AWS), `AWS_REGION` /
`AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (or a profile, an instance
role, ...).

Publishing uploads the staged data files first and the sidecar (`meta.json`) last, so a reader
that finds the sidecar finds every file; a previous attempt's sidecar is deleted before anything
is replaced. Files above `multipart_threshold_bytes` go up as multipart uploads (boto3's managed
transfer); the janitor aborts multipart uploads that killed workers left open.
"""

from __future__ import annotations

import logging
import mimetypes
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from ..files import JOBS_DIR, META_FILE, THUMBNAIL_FILE, VIDEO_FILE
from ..keys import JOB_ID_RE, check_job_id
from .base import Body, ObjectInfo, Staged, Storage, StorageUnavailable

log = logging.getLogger("contract.storage")

# Files at least this big are uploaded in parts (boto3's managed transfer); smaller ones in one PUT.
MULTIPART_THRESHOLD_BYTES = 64 * 1024 * 1024
# Size of each part of a multipart upload (S3 needs at least 5 MiB for every part but the last).
MULTIPART_CHUNK_BYTES = 16 * 1024 * 1024
# One request's network limits. Retries inside boto3 stay few: callers decide how long to retry
# (the worker's STORAGE_RETRY_S, the API's 503 + Retry-After).
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 2

CONTENT_TYPES = {
    VIDEO_FILE: "video/mp4",
    THUMBNAIL_FILE: "image/jpeg",
    META_FILE: "application/json",
}
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` -> `("bucket", "some/prefix")`; `ValueError` if it is not one."""
    if not url.startswith("s3://"):
        raise ValueError(f"an S3 storage URL looks like s3://bucket/prefix, got {url!r}")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not _BUCKET_RE.fullmatch(bucket):
        raise ValueError(
            f"{url!r}: bucket names are 3-63 lowercase letters, digits, dots and hyphens"
        )
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise ValueError(f"{url!r}: the prefix has an empty, '.' or '..' segment")
    return bucket, prefix


def endpoint_from_env(environ: Mapping[str, str] = os.environ) -> str | None:
    """The S3 endpoint the environment names: `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL` or
    `S3_ENDPOINT_URL` (first set wins); None means AWS itself."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL"):
        if environ.get(name, "").strip():
            return environ[name].strip()
    return None


def region_from_env(environ: Mapping[str, str] = os.environ) -> str:
    """`AWS_REGION`, else `AWS_DEFAULT_REGION`, else `us-east-1` (what S3-compatible servers
    expect when they ignore regions)."""
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if environ.get(name, "").strip():
            return environ[name].strip()
    return "us-east-1"


class S3Storage(Storage):
    """Results under `s3://bucket/prefix` (see the module docstring). `data_dir` holds only this
    process's staging directories."""

    kind: ClassVar[str] = "s3"

    def __init__(
        self,
        url: str,
        data_dir: str | Path,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        public_endpoint_url: str | None = None,
        multipart_threshold_bytes: int = MULTIPART_THRESHOLD_BYTES,
        multipart_chunk_bytes: int = MULTIPART_CHUNK_BYTES,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        read_timeout_s: float = READ_TIMEOUT_S,
        max_attempts: int = MAX_ATTEMPTS,
    ):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        super().__init__(data_dir)
        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)
        self.base = f"{self.prefix}/" if self.prefix else ""
        self.endpoint_url = endpoint_url or endpoint_from_env()
        self.region = region or region_from_env()
        self.public_endpoint_url = public_endpoint_url or None
        self.config = Config(
            region_name=self.region,
            signature_version="s3v4",
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            # Path-style URLs (endpoint/bucket/key) work with every S3-compatible server; AWS
            # itself picks virtual-hosted ones.
            s3={"addressing_style": "path" if self.endpoint_url else "auto"},
            # Checksums only where S3 requires them: several S3-compatible servers reject the
            # newer default ones.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.session = boto3.session.Session()
        self.client = self.session.client("s3", endpoint_url=self.endpoint_url, config=self.config)
        self._presigner: Any = None
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold_bytes,
            multipart_chunksize=multipart_chunk_bytes,
            max_concurrency=4,
        )

    # -- keys ------------------------------------------------------------------------------------
    def job_prefix(self, job_id: str) -> str:
        return f"{self.base}{JOBS_DIR}/{check_job_id(job_id)}/"

    def key(self, job_id: str, name: str) -> str:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"file name must be a plain name, got {name!r}")
        return self.job_prefix(job_id) + name

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.base} at {self.endpoint_url or 'AWS'} ({self.region})"

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Storage failures as `StorageUnavailable` naming what was tried."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            err = exc.response.get("Error", {})
            raise StorageUnavailable(
                f"{what}: {self.describe()} answered {err.get('Code', '?')}"
                f" ({err.get('Message') or exc})"
            ) from exc
        except (BotoCoreError, S3UploadFailedError) as exc:
            raise StorageUnavailable(f"{what}: {self.describe()}: {exc}") from exc

    # -- worker side -----------------------------------------------------------------------------
    def publish(self, staged: Staged) -> str:
        names = sorted(os.listdir(staged.path))
        data = [n for n in names if n != META_FILE]
        with self._errors(f"publishing job {staged.job_id}"):
            # The job must not look complete while an earlier attempt's files are replaced.
            self.client.delete_object(Bucket=self.bucket, Key=self.key(staged.job_id, META_FILE))
            for name in data + ([META_FILE] if META_FILE in names else []):
                self.upload(staged.path / name, self.key(staged.job_id, name))
        return f"s3://{self.bucket}/{self.job_prefix(staged.job_id)}"

    def upload(self, path: Path, key: str) -> None:
        """One file, in parts when it is above the multipart threshold."""
        content_type = CONTENT_TYPES.get(path.name) or (
            mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        )
        self.client.upload_file(
            str(path),
            self.bucket,
            key,
            ExtraArgs={"ContentType": content_type},
            Config=self.transfer,
        )

    def clean_staging(self, older_than_s: float) -> list[str]:
        """Local staging directories, and multipart uploads under the prefix started more than
        `older_than_s` ago (a worker killed mid-upload); storage being down skips the latter."""
        removed = super().clean_staging(older_than_s)
        cutoff = time.time() - older_than_s
        try:
            with self._errors("listing unfinished multipart uploads"):
                pages = self.client.get_paginator("list_multipart_uploads").paginate(
                    Bucket=self.bucket, Prefix=self.base
                )
                for page in pages:
                    for up in page.get("Uploads", []):
                        if up["Initiated"].timestamp() < cutoff:
                            self.client.abort_multipart_upload(
                                Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"]
                            )
                            removed.append(f"multipart:{up['Key']}")
        except StorageUnavailable as exc:
            log.warning("could not clean multipart uploads: %s", exc)
        return removed

    # -- API side --------------------------------------------------------------------------------
    def stat(self, job_id: str, name: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        key = self.key(job_id, name)
        with self._errors(f"reading {key}"):
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _code(exc) in _NOT_FOUND:
                    return None
                raise
        etag = head.get("ETag") or ""
        return ObjectInfo(
            size=int(head["ContentLength"]),
            etag=etag if etag.startswith('"') else f'"{etag}"',
            last_modified=head["LastModified"].timestamp(),
        )

    def open(self, job_id: str, name: str, start: int = 0, end: int | None = None) -> Body:
        from botocore.exceptions import ClientError

        key = self.key(job_id, name)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if start or end is not None:
            args["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        with self._errors(f"reading {key}"):
            try:
                return self.client.get_object(**args)["Body"]
            except ClientError as exc:
                if _code(exc) in _NOT_FOUND:
                    raise FileNotFoundError(f"s3://{self.bucket}/{key}") from None
                raise

    def presigned_url(
        self,
        job_id: str,
        name: str,
        *,
        expires_s: int,
        content_type: str | None = None,
        content_disposition: str | None = None,
    ) -> str:
        """Signed offline (no request): for the endpoint clients reach, `public_endpoint_url`
        when the servers use an internal one."""
        if self._presigner is None:
            self._presigner = (
                self.session.client("s3", endpoint_url=self.public_endpoint_url, config=self.config)
                if self.public_endpoint_url
                else self.client
            )
        params = {"Bucket": self.bucket, "Key": self.key(job_id, name)}
        if content_type:
            params["ResponseContentType"] = content_type
        if content_disposition:
            params["ResponseContentDisposition"] = content_disposition
        return self._presigner.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=int(expires_s)
        )

    # -- both ------------------------------------------------------------------------------------
    def _objects(self, prefix: str) -> Iterator[dict]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        for page in pages:
            yield from page.get("Contents", [])

    def remove(self, job_id: str) -> bool:
        """Every object under the job's prefix (not only the known files)."""
        prefix = self.job_prefix(job_id)
        removed = False
        with self._errors(f"removing {prefix}"):
            keys = [obj["Key"] for obj in self._objects(prefix)]
            meta = self.key(job_id, META_FILE)
            if meta in keys:
                # The sidecar first: objects left by an interrupted removal never look like a
                # result (the janitor would take them for one).
                self.client.delete_object(Bucket=self.bucket, Key=meta)
                keys.remove(meta)
                removed = True
            for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
                batch = keys[i : i + 1000]
                out = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
                if out.get("Errors"):
                    first = out["Errors"][0]
                    raise StorageUnavailable(
                        f"removing {prefix}: {len(out['Errors'])} object(s) not deleted, e.g. "
                        f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                    )
                removed = True
        return removed

    def exists(self, job_id: str) -> bool:
        return self.stat(job_id, META_FILE) is not None

    def job_ids(self) -> list[str]:
        prefix = f"{self.base}{JOBS_DIR}/"
        found = []
        with self._errors(f"listing {prefix}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, Delimiter="/"
            )
            for page in pages:
                for common in page.get("CommonPrefixes", []):
                    name = common["Prefix"][len(prefix) :].rstrip("/")
                    if JOB_ID_RE.fullmatch(name):
                        found.append(name)
        return sorted(found)

    def age_s(self, job_id: str) -> float:
        with self._errors(f"listing {self.job_prefix(job_id)}"):
            times = [o["LastModified"].timestamp() for o in self._objects(self.job_prefix(job_id))]
        return max(0.0, time.time() - max(times)) if times else 0.0

    def check(self) -> None:
        with self._errors(f"checking bucket {self.bucket}"):
            self.client.head_bucket(Bucket=self.bucket)


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
