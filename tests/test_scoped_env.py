"""dlopt.core.scoped_env.environ: the one scoped os.environ change (TVM's fallback, NNCF's import, MLflow's file store)."""

from __future__ import annotations

import os

import pytest

from dlopt.core.scoped_env import environ
from dlopt.deploy.tracking import file_store_allowed


def test_values_hold_for_the_block_and_are_put_back_even_on_an_error(monkeypatch):
    monkeypatch.setenv("DLOPT_T_SET", "before")
    monkeypatch.delenv("DLOPT_T_UNSET", raising=False)
    with pytest.raises(RuntimeError), environ(DLOPT_T_SET="inside", DLOPT_T_UNSET="1"):
        assert (os.environ["DLOPT_T_SET"], os.environ["DLOPT_T_UNSET"]) == ("inside", "1")
        raise RuntimeError
    assert os.environ["DLOPT_T_SET"] == "before" and "DLOPT_T_UNSET" not in os.environ


@pytest.mark.parametrize("uri, preset, inside", [("file:///tmp/mlruns", None, "true"),
                                                 ("file:///tmp/mlruns", "false", "false"),
                                                 ("sqlite:///mlflow.db", None, None)])
def test_mlflow_file_store_is_allowed_only_for_a_file_uri_and_never_overridden(monkeypatch, uri, preset, inside):
    key = "MLFLOW_ALLOW_FILE_STORE"
    monkeypatch.delenv(key, raising=False)
    if preset is not None:
        monkeypatch.setenv(key, preset)
    with file_store_allowed(uri):
        assert os.environ.get(key) == inside
    assert os.environ.get(key) == preset
