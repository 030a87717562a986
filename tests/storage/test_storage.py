"""raysky.storage.read_bytes: missing objects fail at once, transient errors are retried."""

from __future__ import annotations

import io

import pyarrow.fs as pafs
import pytest

from raysky import storage


class _FlakyFS:
    """Fails the first ``failures`` opens with an OSError, as throttled S3 does."""

    def __init__(self, failures: int, missing: bool = False):
        self.failures, self.missing, self.opens = failures, missing, 0

    def open_input_stream(self, path):
        self.opens += 1
        if self.missing or self.opens <= self.failures:
            raise OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate.")
        return io.BytesIO(b"0123456789")

    def get_file_info(self, path):
        return pafs.FileInfo(path, pafs.FileType.NotFound if self.missing else pafs.FileType.File)


@pytest.fixture
def no_sleep(monkeypatch):
    waits = []
    monkeypatch.setattr(storage.time, "sleep", waits.append)
    return waits


def test_transient_errors_are_retried_with_backoff(monkeypatch, no_sleep):
    fs = _FlakyFS(failures=2)
    monkeypatch.setattr(storage, "resolve", lambda uri: (fs, "bucket/key"))
    assert storage.read_bytes("s3://bucket/key") == b"0123456789"
    assert fs.opens == 3 and len(no_sleep) == 2 and no_sleep[1] > no_sleep[0] * 0.6
    assert storage.read_bytes("s3://bucket/key", limit=3) == b"0123"  # limit + 1 bytes


def test_what_stays_unreadable_raises_after_the_last_try(monkeypatch, no_sleep):
    fs = _FlakyFS(failures=100)
    monkeypatch.setattr(storage, "resolve", lambda uri: (fs, "bucket/key"))
    with pytest.raises(OSError, match="SLOW_DOWN"):
        storage.read_bytes("s3://bucket/key")
    assert fs.opens == storage.READ_ATTEMPTS and len(no_sleep) == storage.READ_ATTEMPTS - 1


def test_a_missing_object_fails_at_once(monkeypatch, no_sleep, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or object"):
        storage.read_bytes(str(tmp_path / "absent.jpg"))
    fs = _FlakyFS(failures=0, missing=True)  # S3's plain OSError for a missing key
    monkeypatch.setattr(storage, "resolve", lambda uri: (fs, "bucket/key"))
    with pytest.raises(FileNotFoundError, match="s3://bucket/key: no such file or object"):
        storage.read_bytes("s3://bucket/key")
    assert fs.opens == 1 and not no_sleep


# --- nothing where the user pointed is an error naming the path, never a silent 0 ----------


def test_uploading_a_missing_or_empty_folder_names_it(tmp_path, s3):
    bucket = s3.create_bucket("upload-nothing")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}: no such folder"):
        storage.upload_directory(str(tmp_path / "nope"), f"{bucket}/x")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no file to upload"):
        storage.upload_directory(str(tmp_path / "empty"), f"{bucket}/x")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        storage.upload_directory(str(tmp_path / "file.txt"), f"{bucket}/x")
    assert storage.list_files(f"{bucket}/x") == []


@pytest.mark.parametrize("format", ["ham10000", "isic2018", "isic2019", "archive"])
def test_reading_a_dataset_where_there_is_none_names_the_path(tmp_path, s3, format):
    from raysky.data.readers import read_dataset
    from raysky.data.records import DatasetError

    bucket = s3.create_bucket("read-nothing")
    for missing in (str(tmp_path / "no-such-dataset"), f"{bucket}/no-such-prefix"):
        with pytest.raises(DatasetError, match="no such folder or prefix") as error:
            read_dataset(missing, format)
        assert str(error.value).startswith(missing)
