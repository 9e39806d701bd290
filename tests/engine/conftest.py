"""Fixtures of the engine tests."""

import pytest


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """shapes-tiny generated once per test module, found through ``$HARMONIC_DATA``."""
    from harmonic.data import ensure_default_dataset  # generated data: only the tests that ask for it

    root = tmp_path_factory.mktemp("data")
    ensure_default_dataset("shapes-tiny", root=root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HARMONIC_DATA", str(root))
        yield root
