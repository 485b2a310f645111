"""paths.check_writable and the skip-config save check built on it."""
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


def test_saving_a_skip_config_needs_a_layer_skip_drafter(tmp_path):
    from selfspec.drafters.layerskip import LayerSkipDrafter, SkipConfig, check_saveable
    from selfspec.drafters.ngram import NgramDrafter
    from selfspec.errors import InvalidParameterError

    check_saveable(LayerSkipDrafter(SkipConfig(model="m", n_layers=4, attention=(1,))), tmp_path / "s.json")
    with pytest.raises(InvalidParameterError, match="--save-skip-config needs --draft layer-skip"):
        check_saveable(NgramDrafter(), tmp_path / "s.json")
