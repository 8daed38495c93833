"""Safety review as tests: no pickle loads, no remote code, no path out of a static
directory, and servers that stay on this machine unless given a secret."""

from __future__ import annotations

import ast
import functools
import http.client
import inspect
from pathlib import Path

import pytest

from rlhflab import models
from rlhflab.errors import InputError
from rlhflab.label import cli as label_cli
from rlhflab.label import server as label_server
from rlhflab.label.db import LabelDB
from rlhflab.sim import server as sim_server

PACKAGE = Path(models.__file__).resolve().parent
SOURCES = sorted(PACKAGE.rglob("*.py"))


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _calls(name: str):
    """(file, call node) for every call of `<anything>.name(...)` or `name(...)` in rlhflab."""
    for path in SOURCES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Call):
                f = node.func
                if (isinstance(f, ast.Attribute) and f.attr == name) or (isinstance(f, ast.Name) and f.id == name):
                    yield path, node


def _keyword(node: ast.Call, key: str):
    for kw in node.keywords:
        if kw.arg == key:
            return kw.value
    return None


def test_sources_are_found():
    assert len(SOURCES) > 20 and PACKAGE / "checkpoint.py" in SOURCES


def test_no_torch_load_without_weights_only_and_no_pickle():
    for path, node in _calls("load"):
        if (
            isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch"
        ):
            value = _keyword(node, "weights_only")
            assert isinstance(value, ast.Constant) and value.value is True, (
                f"{path}:{node.lineno}: torch.load without weights_only=True"
            )
    for path in SOURCES:
        tree = _tree(path)
        imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names} | {
            n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
        }
        assert not imported & {"pickle", "dill", "cloudpickle", "joblib"}, path
    for path, node in _calls("load"):  # yaml.load can build arbitrary objects; safe_load cannot
        assert not (
            isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "yaml"
        ), f"{path}:{node.lineno}: yaml.load"


def test_trust_remote_code_is_never_on_by_default():
    calls = [(path, node) for path in SOURCES for node in ast.walk(_tree(path)) if isinstance(node, ast.Call)]
    assert any(_keyword(node, "trust_remote_code") is not None for _, node in calls)
    for path, node in calls:
        value = _keyword(node, "trust_remote_code")
        assert value is None or not (isinstance(value, ast.Constant) and value.value is True), (
            f"{path}:{node.lineno}: trust_remote_code is passed a literal True"
        )
    for fn in (models.load_causal_lm, models.load_reward_model):
        params = inspect.signature(fn).parameters
        if "trust_remote_code" in params:
            assert params["trust_remote_code"].default is False, fn.__name__


# --------------------------------------------------------------------------- servers


@pytest.fixture
def label_db(tmp_path):
    return LabelDB(tmp_path / "labels.db")


def _get(url_host: str, port: int, path: str) -> int:
    conn = http.client.HTTPConnection(url_host, port, timeout=5)
    conn.request("GET", path, headers={"Host": f"127.0.0.1:{port}"})
    status = conn.getresponse().status
    conn.close()
    return status


def test_sim_server_binds_loopback_by_default_and_refuses_open_hosts_without_a_token():
    assert inspect.signature(sim_server.make_server).parameters["host"].default == "127.0.0.1"
    server = sim_server.make_server(port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()
    for host in ("0.0.0.0", "::", "192.168.1.10"):
        with pytest.raises(InputError, match="token"):
            sim_server.make_server(host, 0, token=None)


def test_label_server_binds_loopback_by_default_and_refuses_open_hosts_without_a_token(label_db):
    default = inspect.signature(label_server.make_server).parameters["host"].default
    assert default == "127.0.0.1"
    server = label_server.make_server(label_db, port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()
    for host in ("0.0.0.0", "::", "192.168.1.10"):
        with pytest.raises(InputError, match="owner-token"):
            label_server.make_server(label_db, host, 0, None)


def test_cli_defaults_are_loopback():
    import argparse

    for add in (sim_server.add_arguments, label_cli.add_arguments):
        parser = argparse.ArgumentParser()
        add(parser)
        args = parser.parse_args(["serve", "--db=x.db"] if add is label_cli.add_arguments else [])
        assert args.host == "127.0.0.1"


ESCAPES = [
    "/static/../server.py",
    "/static/%2e%2e/server.py",
    "/../../../../etc/passwd",
    "/static/..%2f..%2fcli.py",
    "//etc/passwd",
    "/static/app.js/../../db.py",
]


@pytest.mark.parametrize("which", ["sim", "label"])
def test_static_paths_cannot_leave_the_static_directory(which, label_db):
    import threading

    server = sim_server.make_server(port=0) if which == "sim" else label_server.make_server(label_db, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        assert _get("127.0.0.1", port, "/static/app.js") == 200  # the files it does serve
        for path in ESCAPES:
            assert _get("127.0.0.1", port, path) in (400, 403, 404), path
    finally:
        server.shutdown()
        server.server_close()
