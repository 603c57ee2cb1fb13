"""The key file (``deployments/keys.py``): what it stores of a key, its mode, and revoking.

How the API uses the keys (401, 403, scopes) is ``test_auth.py``'s.
"""

from __future__ import annotations

import json
import os
import stat

import pytest

from deployments.keys import KeyFile, hash_key, keys_path


@pytest.fixture
def state(tmp_path):
    return tmp_path


@pytest.fixture
def keys(state) -> dict[str, str]:
    """Keys as ``test_auth.py``'s matrix makes them: good (every model), b_only, and one
    revoked."""
    file = KeyFile(keys_path(state))
    made = {
        "good": file.create("admin")[1],
        "b_only": file.create("b-user", ["fake:b"])[1],
        "revoked": file.create("old")[1],
    }
    file.revoke("old")
    return made


def test_the_key_file_holds_no_plaintext_key(state, keys):
    path = keys_path(state)
    text = path.read_text()
    for key in keys.values():
        assert key not in text
        assert key[len("corral-") :][:12] not in text  # not even a prefix
        assert hash_key(key) in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert {k["name"] for k in json.loads(text)["keys"]} == {"admin", "b-user", "old"}


def test_key_file_revoke_by_id_or_name(tmp_path):
    file = KeyFile(keys_path(tmp_path))
    one, _ = file.create("same")
    two, _ = file.create("same")
    with pytest.raises(ValueError, match="2 keys are named 'same'"):
        file.revoke("same")
    with pytest.raises(KeyError):
        file.revoke("missing")
    assert file.revoke(two.id).revoked
    assert [k.revoked for k in file.read()] == [False, True]
    assert not file.read()[0].revoked and file.read()[0].id == one.id
