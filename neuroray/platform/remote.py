"""URL schemes neuroray accepts, and checks that a bucket or server is reachable before work.

Storage libraries retry for many seconds on missing credentials or no network; these checks
fail in about a second with one line saying what to configure (credentials, an fsspec extra).
"""

from __future__ import annotations

import importlib.util
import os
import re

from neuroray.errors import VolumeError

REMOTE_SCHEMES = ("gs://", "s3://", "http://", "https://")
#: Format prefixes a URL may start with, before an optional storage scheme.
FORMAT_SCHEMES = ("precomputed", "zarr", "zarr2", "zarr3")
#: Where volumes may live: a local path (or file://), a bucket or a web server.
STORAGE_SCHEMES = ("file", "gs", "s3", "http", "https")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
#: fsspec backends zarr needs per scheme, and the neuroray extra that installs each.
FSSPEC_BACKENDS = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs")}


def url_scheme(url: str) -> str | None:
    """The storage scheme of ``url`` after any format prefix (``s3`` for ``zarr://s3://b/x``),
    ``None`` for a local path."""
    match = _SCHEME.match(url)
    if match and match.group(1) in FORMAT_SCHEMES:
        match = _SCHEME.match(url[match.end() :])
    return match.group(1) if match else None


def check_url_scheme(url: str) -> None:
    """Refuse URL schemes neuroray has no backend for (instead of writing ``./ftp:/host/x``)."""
    allowed = ", ".join(f"{s}://" for s in (*FORMAT_SCHEMES[:2], *STORAGE_SCHEMES))
    match = _SCHEME.match(url)
    rest = url
    if match and match.group(1) in FORMAT_SCHEMES:
        rest = url[match.end() :]
        match = _SCHEME.match(rest)
    if match and match.group(1) not in STORAGE_SCHEMES:
        raise VolumeError(
            f"{url}: unsupported URL scheme {match.group(1)}://; use a local path or one of "
            f"{allowed} (e.g. precomputed://gs://bucket/layer, zarr://s3://bucket/x.zarr)"
        )


def _bucket_of(url: str) -> str:
    rest = url
    for _ in range(2):
        match = _SCHEME.match(rest)
        if match:
            rest = rest[match.end() :]
    return rest.split("/", 1)[0]


def _aws_help(url: str, zarr: bool) -> str:
    where = (
        "~/.aws/credentials or AWS_PROFILE"
        if zarr
        else "~/.cloudvolume/secrets/aws-secret.json (keys AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY) or ~/.aws/credentials"
    )
    return (
        f"{url}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
        f"(and AWS_SESSION_TOKEN) in the environment, or write {where}"
    )


def _google_help(url: str) -> str:
    return (
        f"{url}: no Google Cloud credentials found; set GOOGLE_APPLICATION_CREDENTIALS to a "
        "service-account JSON key, write ~/.cloudvolume/secrets/google-secret.json, or run "
        "`gcloud auth application-default login`; a public bucket is also readable as "
        "https://storage.googleapis.com/<bucket>/<path>"
    )


def _aws_credentials_found(bucket: str) -> bool:
    """Whether CloudVolume (its secrets files, then boto3's chain) will find AWS credentials."""
    from cloudfiles.secrets import aws_credentials

    try:
        if aws_credentials(bucket, "s3").get("AWS_ACCESS_KEY_ID"):
            return True
    except KeyError as err:  # cloudfiles reads all three variables once the first two are set
        raise VolumeError(
            f"s3://{bucket}: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are set but {err} is "
            "not; CloudVolume reads all three (or write ~/.cloudvolume/secrets/aws-secret.json)"
        ) from None
    import botocore.session

    try:
        return botocore.session.Session().get_credentials() is not None
    except Exception:  # noqa: BLE001 - a broken profile is as good as none
        return False


def _google_credentials_found(bucket: str) -> bool:
    """Whether CloudVolume (its secrets files, then google-auth's defaults) will find any,
    decided from files and the environment only: no metadata-server round trip."""
    from cloudfiles.secrets import secretpath

    if any(
        os.path.exists(secretpath(name))
        for name in (f"{bucket}-google-secret.json", "google-secret.json")
    ):
        return True
    if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS") or os.environ.get("GCE_METADATA_HOST"):
        return True
    gcloud = os.environ.get("CLOUDSDK_CONFIG") or os.path.expanduser("~/.config/gcloud")
    if os.path.isfile(os.path.join(gcloud, "application_default_credentials.json")):
        return True
    if os.environ.get("NO_GCE_CHECK") == "true":  # google-auth then skips the metadata server
        return False
    try:  # on a Google Cloud VM the metadata server supplies credentials
        with open("/sys/class/dmi/id/product_name") as f:
            return f.read().startswith("Google")
    except OSError:
        return False


def _probe_http(url: str) -> None:
    """One request (no retries) so an unreachable host fails in seconds, not after a minute."""
    import requests

    try:
        response = requests.get(url, timeout=(5, 30), stream=True)
        response.close()
    except requests.RequestException as err:
        raise VolumeError(
            f"cannot reach {url}: {type(err).__name__}; check the URL, the network and any "
            "proxy settings (HTTPS_PROXY / HTTP_PROXY)"
        ) from None
    if response.status_code == 404:
        raise VolumeError(f"no volume at {url}: the server answers 404 Not Found")
    if response.status_code in (401, 403):
        raise VolumeError(
            f"{url}: the server refuses access ({response.status_code}); this layer is not public"
        )
    if response.status_code >= 400:
        raise VolumeError(f"{url}: the server answers HTTP {response.status_code}")


def check_remote_access(url: str, format_name: str, *, create: bool = False) -> None:
    """Fail fast, before any library's retry loop, when a remote volume cannot be reached:
    missing credentials, a missing fsspec backend, an unreachable web server."""
    scheme = url_scheme(url)
    if scheme in (None, "file"):
        return
    if create and scheme in ("http", "https"):
        raise VolumeError(
            f"{url}: http(s) volumes are read-only; write to a local path, gs:// or s3://"
        )
    if format_name == "zarr":
        if scheme in FSSPEC_BACKENDS:
            package, extra = FSSPEC_BACKENDS[scheme]
            if importlib.util.find_spec(package) is None:
                raise VolumeError(
                    f"{url}: zarr on {scheme}:// needs the fsspec backend {package}; install it "
                    f"with `pip install 'neuroray[{extra}]'`"
                )
        return
    bucket = _bucket_of(url)
    if scheme == "s3" and not _aws_credentials_found(bucket):
        raise VolumeError(_aws_help(url, zarr=False))
    if scheme == "gs" and not _google_credentials_found(bucket):
        raise VolumeError(_google_help(url))
    if scheme in ("http", "https") and not create:
        _probe_http(url.removeprefix("precomputed://").rstrip("/") + "/info")


def remote_error(url: str, err: Exception, format_name: str) -> VolumeError:
    """A storage library's exception on a remote URL, as one line that says what to configure."""
    name = type(err).__name__
    text = str(err).splitlines()[0] if str(err) else name
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return VolumeError(_aws_help(url, zarr=format_name == "zarr"))
    if name in ("DefaultCredentialsError", "RefreshError"):
        return VolumeError(_google_help(url))
    if name in ("ConnectionError", "Timeout", "ConnectTimeout", "ReadTimeout"):
        return VolumeError(
            f"cannot reach {url}: {text}; check the URL, the network and any proxy settings"
        )
    if isinstance(err, ImportError) or "install" in text.lower():
        scheme = url_scheme(url)
        package, extra = FSSPEC_BACKENDS.get(scheme or "", (None, None))
        if package:
            return VolumeError(
                f"{url}: {format_name} on {scheme}:// needs {package}; install it with "
                f"`pip install 'neuroray[{extra}]'`"
            )
    if name in ("Forbidden", "AccessDenied", "Unauthorized") or "403" in text:
        return VolumeError(f"{url}: access denied ({text}); check the credentials' permissions")
    return VolumeError(f"cannot open {url}: {name}: {text}")
