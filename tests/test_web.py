"""The loopback rule the label and sim servers share (rlhflab.web)."""

from __future__ import annotations

import pytest

from rlhflab.label import server as label_server
from rlhflab.sim import server as sim_server
from rlhflab.web import is_loopback


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "LOCALHOST",
        "127.0.0.1",
        "127.1.2.3",
        "::1",
        "[::1]",
        "0:0:0:0:0:0:0:1",
        "::ffff:127.0.0.1",
        "[::ffff:127.0.0.1]",
        "::ffff:7f00:1",
    ],
)
def test_loopback_hosts(host):
    assert is_loopback(host)


@pytest.mark.parametrize(
    "host",
    [
        "",
        "0.0.0.0",
        "::",
        "10.0.0.1",
        "192.168.1.5",
        "::ffff:10.0.0.1",
        "[::ffff:8.8.8.8]",
        "2001:db8::1",
        "example.com",
        "localhost.example.com",
        "127.0.0.1.example.com",
        "[::1",
        "::1]",
        "[]",
        "[localhost",
        "128.0.0.1",
        "not an address",
    ],
)
def test_not_loopback_hosts(host):
    assert not is_loopback(host)


def test_both_servers_use_the_shared_rule():
    assert label_server.is_loopback is is_loopback and sim_server.is_loopback is is_loopback


def test_label_server_treats_mapped_and_bracketed_loopback_as_loopback(tmp_path):
    """The label server's own copy said no to these; a loopback host needs no owner token."""
    from rlhflab.errors import InputError
    from rlhflab.label.db import LabelDB

    db = LabelDB(tmp_path / "labels.db")
    for host in ("::ffff:127.0.0.1", "[::1]"):
        try:
            label_server.make_server(db, host, 0, None).server_close()
        except InputError as e:  # it listens over IPv4 only, so binding may fail; never refused as remote
            assert "non-loopback" not in str(e)
    db.close()
