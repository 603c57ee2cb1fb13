"""The registry client's parts that need no network: the Bearer challenge. (Pulls over
HTTP from a real registry: tests/integration/test_registry.py.)"""

from __future__ import annotations

from nodes.pull import parse_challenge


def test_parse_challenge():
    header = (
        'Bearer realm="https://auth.example.com/token",service="registry.example.com",'
        'scope="repository:library/x:pull"'
    )
    assert parse_challenge(header) == (
        "bearer",
        {
            "realm": "https://auth.example.com/token",
            "service": "registry.example.com",
            "scope": "repository:library/x:pull",
        },
    )
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})
