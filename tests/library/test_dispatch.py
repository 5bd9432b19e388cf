"""The dispatcher: explicit, environment and auto selection, errors, the backend table, the CLI."""

import json
import logging

import pytest
import torch

import raid_fast
from raid_fast import _dispatch


@pytest.fixture
def toy_op():
    name = "toy_op_for_tests"
    _dispatch.register(name, "torch", lambda x: ("torch", x), priority=100)
    _dispatch.register(
        name, "cpp", lambda x: ("cpp", x), priority=10, supports=lambda x: None if x > 0 else f"needs x > 0, got {x}"
    )
    _dispatch.register(name, "cuda", lambda x: ("cuda", x), priority=0, available=lambda: "no GPU here")
    _dispatch.register(name, "triton", lambda x: ("triton", x), priority=1, auto=False)
    yield name
    del _dispatch._REGISTRY[name]


def test_auto_picks_first_available_that_supports(toy_op):
    assert _dispatch.call(toy_op, 3) == ("cpp", 3)
    assert _dispatch.call(toy_op, -1) == ("torch", -1)


def test_auto_logs_choice_once(toy_op, caplog):
    _dispatch._LOGGED.discard((toy_op, "cpp"))
    with caplog.at_level(logging.INFO, logger="raid_fast"):
        _dispatch.call(toy_op, 1)
        _dispatch.call(toy_op, 2)
    assert [r.getMessage() for r in caplog.records].count(f"raid_fast: {toy_op} -> cpp") == 1


def test_explicit_backend_and_environment(toy_op, monkeypatch):
    assert _dispatch.call(toy_op, 3, backend="torch") == ("torch", 3)
    assert _dispatch.call(toy_op, 3, backend="triton") == ("triton", 3)
    monkeypatch.setenv("RAID_FAST_BACKEND", "torch")
    assert _dispatch.call(toy_op, 3) == ("torch", 3)
    # the argument wins over the environment
    assert _dispatch.call(toy_op, 3, backend="cpp") == ("cpp", 3)


def test_explicit_backend_that_cannot_serve_raises_with_reasons(toy_op, monkeypatch):
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot serve this call: no GPU here.*cpp: ok"):
        _dispatch.call(toy_op, 3, backend="cuda")
    with pytest.raises(RuntimeError, match=r"backend 'cpp' cannot serve this call: needs x > 0, got -2"):
        _dispatch.call(toy_op, -2, backend="cpp")
    monkeypatch.setenv("RAID_FAST_BACKEND", "nope")
    with pytest.raises(RuntimeError, match=r"RAID_FAST_BACKEND='nope' is not a registered backend"):
        _dispatch.call(toy_op, 1)


def test_unknown_op_and_bad_backend_name():
    with pytest.raises(RuntimeError, match="unknown op 'nope'"):
        _dispatch.call("nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        _dispatch.register("x", "gpu", lambda: None, priority=0)


def test_backends_table(toy_op):
    table = raid_fast.backends()
    assert table[toy_op] == {"cuda": "no GPU here", "cpp": "ok", "triton": "ok (explicit requests only)", "torch": "ok"}
    for op in ("kmeans_assign", "kmeans_update", "kmeans_step", "kmeans_plusplus"):
        assert table[op]["torch"] == "ok"
        assert set(table[op]) >= {"torch", "cpp", "cuda"}
    # triton (when importable) runs only the half-precision Lloyd loop
    assert set(table["kmeans_update"]) == set(table["kmeans_plusplus"]) == {"torch", "cpp", "cuda"}
    assert set(table["kmeans_step"]) - {"torch", "cpp", "cuda"} <= {"triton"}


def test_broken_availability_check_is_a_reason_not_a_crash():
    name = "toy_broken"

    def boom():
        raise OSError("libfoo.so missing")

    _dispatch.register(name, "torch", lambda: "ref", priority=100)
    _dispatch.register(name, "cpp", lambda: "fast", priority=0, available=boom)
    try:
        assert _dispatch.call(name) == "ref"
        assert "libfoo.so missing" in raid_fast.backends()[name]["cpp"]
    finally:
        del _dispatch._REGISTRY[name]


def test_import_needs_torch_only():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['raid_fast._C'] = None\n"
        "import raid_fast, torch\n"
        "print(raid_fast.kmeans(torch.randn(20, 3), 2).centroids.shape)\n"
        "print(raid_fast.backends()['kmeans_assign']['cpp'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "torch.Size([2, 3])" in out
    assert "not built or failed to import" in out


def test_kernels_package_is_namespaced():
    import importlib.util

    import raid_fast.kernels

    assert raid_fast.kernels.__name__ == "raid_fast.kernels"
    # a top-level `kernels` is another PyPI distribution; we never install one
    spec = importlib.util.find_spec("kernels")
    assert spec is None or "raid_fast" not in str(spec.origin)


def test_cli_env(capsys):
    from raid_fast.app import cli

    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "kmeans_assign" in out
    assert cli.main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__
    assert info["backends"]["kmeans_assign"]["torch"] == "ok"
