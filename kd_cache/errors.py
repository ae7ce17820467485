"""The one error policy of every `kd` command: which exceptions are reported as one `error: ...` line, and how.

Exit 2 (`user_errors`): the arguments or inputs are wrong: a bad value (ValueError), a path that does not exist
(FileNotFoundError), damaged inputs kd was told not to skip (DataError). Exit 1 (`storage_errors`): the storage
said no: folders, object stores, the hub (permissions, credentials, network).

Kept free of heavy imports (no torch): `kd cache info|verify` import it too.
"""

from __future__ import annotations


class StorageError(RuntimeError):
    """Reading or writing the cache's storage failed; the message names the file and where it was going."""


class DataError(RuntimeError):
    """Inputs are damaged or incomplete (an unreadable shard, a missing image) and kd was not told to skip them."""


class ShardWriterError(RuntimeError):
    """The background shard writer (or the upload it runs) failed; the message names the shard."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exit 2: what the user named or passed is wrong (checked before `storage_errors`, which FileNotFoundError,
    an OSError, would otherwise match)."""
    return (ValueError, FileNotFoundError, DataError)


def storage_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the storage said no": OSError (PermissionError, FileNotFoundError, network
    errors, huggingface_hub's HfHubHTTPError and missing-token errors), this module's errors, and botocore's
    (NoCredentialsError, ClientError...) when boto is installed."""
    errors: list[type[BaseException]] = [OSError, StorageError, ShardWriterError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError  # optional: the `remote` extra (s3fs)
    except ImportError:
        pass
    else:
        errors += [BotoCoreError, ClientError]
    return tuple(errors)


def describe(e: BaseException) -> str:
    """One line for a storage error: its message, the exception type where the message alone is unclear, and what
    to do for missing credentials."""
    if isinstance(e, (StorageError, ShardWriterError)):
        return str(e)
    name = type(e).__name__
    text = " ".join(str(e).split()) or name
    hint = ""
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        hint = (" (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE; AWS_ENDPOINT_URL for other "
                "S3-compatible stores)")
    elif name == "LocalTokenNotFoundError" or (getattr(getattr(e, "response", None), "status_code", None) in (401, 403)
                                               and "huggingface_hub" in type(e).__module__):
        hint = " (log in with `hf auth login`, set HF_TOKEN or pass --token)"
    if isinstance(e, FileNotFoundError) or text.startswith(name):  # kd's own messages say what is missing
        return f"{text}{hint}"
    return f"{name}: {text}{hint}"


class MissingDependencyError(ImportError, ValueError):
    """A URL needs a package that is not installed (fsspec's filesystem for its protocol). Also a ValueError, so
    every command prints it as one `error: ...` line (exit 2) naming what to install."""


def missing_dependency(url: str, e: ImportError) -> MissingDependencyError:
    """The error for `url` when fsspec could not import its filesystem: fsspec's own message plus the extra to
    install."""
    import fsspec  # deferred: the CLI imports this module at start, fsspec only on an import failure

    protocol = fsspec.utils.get_protocol(str(url))
    what = " ".join(str(e).split()) or type(e).__name__
    if protocol in ("http", "https", "s3", "s3a"):
        fix = "pip install 'kd-offline[remote]' (it brings aiohttp and requests for http(s)://, s3fs for s3://)"
    elif protocol in ("gs", "gcs"):
        fix = "pip install gcsfs"
    elif protocol in ("az", "abfs", "abfss"):
        fix = "pip install adlfs"
    else:
        fix = f"install the fsspec implementation of {protocol}://"
    return MissingDependencyError(f"cannot open {url}: {what}; {fix}")
