"""The error contract: classification, the one-line report, and the documented exit-code table."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest

from megatron_ts import errors
from megatron_ts.errors import classify, run_cli

ROOT = Path(__file__).resolve().parents[2]


def test_known_classes_carry_their_documented_code():
    from data_tools.shards import InputError
    from megatron_ts.checkpoint.model_files import CheckpointError
    from megatron_ts.config import ConfigError
    from megatron_ts.data.manifest import ManifestError
    from megatron_ts.data.pipeline import CorruptDataError
    from megatron_ts.data.sources import DataSourceError
    from megatron_ts.data.state import LoaderStateError
    from megatron_ts.hf.pipeline_token_shuffle import ModelDirError
    from megatron_ts.hf.vq_token_shuffle import VQCheckpointError
    from megatron_ts.storage import StorageError
    from megatron_ts.training.nonfinite import NonFiniteWeightsError
    from megatron_ts.training.trainer import TrainingError
    from megatron_ts.vocab import VocabMismatchError

    expected = {
        ConfigError: 2,
        InputError: 2,
        VocabMismatchError: 2,
        ModelDirError: 2,
        VQCheckpointError: 2,
        CorruptDataError: 3,
        DataSourceError: 3,
        ManifestError: 3,
        LoaderStateError: 3,
        StorageError: 4,
        CheckpointError: 5,
        TrainingError: 6,
        NonFiniteWeightsError: 6,
    }
    for cls, code in expected.items():
        assert classify(cls("what (where): fix")) == (code, "what (where): fix"), cls


@pytest.mark.parametrize(
    "err,code,words",
    [
        (OSError(errno.ENOSPC, "No space left on device", "/runs/a/x"), 4, "disk full (/runs/a/x)"),
        (OSError(errno.EROFS, "Read-only file system", "/ro/run"), 4, "read-only file system"),
        (PermissionError(errno.EACCES, "Permission denied", "/etc/x"), 4, "permission denied"),
        (
            FileNotFoundError(errno.ENOENT, "No such file", "/nope.toml"),
            2,
            "not found (/nope.toml)",
        ),
    ],
)
def test_platform_errors_become_one_line(err, code, words):
    got, line = classify(err)
    assert got == code and words in line and "\n" not in line


def test_s3_credential_and_access_errors_are_storage_failures():
    from botocore.exceptions import ClientError, NoCredentialsError

    code, line = classify(NoCredentialsError())
    assert code == 4 and "AWS_ACCESS_KEY_ID" in line
    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "GetObject")
    code, line = classify(denied)
    assert code == 4 and "AccessDenied" in line
    throttled = ClientError({"Error": {"Code": "SlowDown", "Message": "later"}}, "GetObject")
    assert classify(throttled) is None  # retried by the readers; exhausted ones raise StorageError


def test_unknown_errors_keep_their_traceback():
    assert classify(ValueError("a bug")) is None
    assert classify(KeyError("x")) is None
    with pytest.raises(ZeroDivisionError):
        run_cli("ts-x", lambda: 1 // 0)


def test_worker_reraised_message_is_cut_to_the_original_line(capsys):
    from megatron_ts.data.pipeline import CorruptDataError

    wrapped = (
        "Caught CorruptDataError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        'call last):\n  File "x.py", line 1, in f\n    raise CorruptDataError(m)\n'
        "megatron_ts.data.pipeline.CorruptDataError: 3 of 100 samples were corrupt (shard a.tar)\n"
    )

    def main() -> int:
        raise CorruptDataError(wrapped)

    assert run_cli("ts-train", main) == 3
    assert capsys.readouterr().err == "ts-train: 3 of 100 samples were corrupt (shard a.tar)\n"


def test_interrupt_is_130(capsys):
    def main() -> int:
        raise KeyboardInterrupt

    assert run_cli("ts-data", main) == 130
    assert capsys.readouterr().err == "ts-data: interrupted\n"


def test_docs_table_matches_the_module():
    """docs/operations.md and megatron_ts/errors.py list the same codes."""
    text = (ROOT / "docs/operations.md").read_text()
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", text, re.M)}
    defined = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    assert documented == defined
