"""paths.check_writable: an output file is checked before the work that fills it."""
from __future__ import annotations

import pytest


def test_check_writable_refuses_folders_and_missing_parents(tmp_path):
    from selfspec.errors import InvalidParameterError
    from selfspec.paths import check_writable

    assert check_writable(tmp_path / "skip.json", "--out") == tmp_path / "skip.json"
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind
    with pytest.raises(InvalidParameterError, match="--out .* is a folder"):
        check_writable(tmp_path, "--out")
    with pytest.raises(InvalidParameterError, match="cannot write --save-skip-config"):
        check_writable(tmp_path / "no" / "skip.json", "--save-skip-config")

