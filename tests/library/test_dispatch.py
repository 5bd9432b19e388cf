"""The dispatcher: explicit, environment and auto selection, errors, the backend table, the CLI."""

import json
import logging

import pytest
import torch

import raid_fast
from raid_fast import _dispatch
from raid_fast._dispatch import Backend, Impl

TOY_BACKENDS = ("toy_gpu", "toy_fast", "toy_interp", "toy_ref")


@pytest.fixture
def toy_op():
    name = "toy_op_for_tests"
    _dispatch.define(name, "(int x, int y=0) -> (str, int)")

    def impl(tag):
        return Impl(lambda x, y: (tag, x + y))

    _dispatch.add_backend(Backend("toy_ref", 100, {name: impl("toy_ref")}))
    fast = Impl(lambda x, y: ("toy_fast", x + y), supports=lambda a: None if a.x > 0 else f"needs x > 0, got {a.x}")
    _dispatch.add_backend(Backend("toy_fast", 10, {name: fast}))
    _dispatch.add_backend(Backend("toy_gpu", 0, {name: impl("toy_gpu")}, available=lambda: "no GPU here"))
    _dispatch.add_backend(Backend("toy_interp", 1, {name: impl("toy_interp")}, auto=False))
    yield name
    for backend in TOY_BACKENDS:
        _dispatch.remove_backend(backend)
    del _dispatch._SPECS[name]


def test_auto_picks_first_available_that_supports(toy_op):
    assert _dispatch.call(toy_op, 3) == ("toy_fast", 3)
    assert _dispatch.call(toy_op, -1) == ("toy_ref", -1)


def test_arguments_bind_by_schema_name(toy_op):
    assert _dispatch.call(toy_op, 3, y=4) == ("toy_fast", 7)
    assert _dispatch.call(toy_op, x=-1, y=4) == ("toy_ref", 3)  # supports() reads args.x
    with pytest.raises(TypeError, match="missing the argument 'x'"):
        _dispatch.call(toy_op)
    with pytest.raises(TypeError, match="unexpected or repeated argument 'z'"):
        _dispatch.call(toy_op, 1, z=2)
    with pytest.raises(TypeError, match="takes 2 arguments"):
        _dispatch.call(toy_op, 1, 2, 3)


def test_auto_logs_choice_once(toy_op, caplog):
    _dispatch._LOGGED.discard((toy_op, "toy_fast"))
    with caplog.at_level(logging.INFO, logger="raid_fast"):
        _dispatch.call(toy_op, 1)
        _dispatch.call(toy_op, 2)
    assert [r.getMessage() for r in caplog.records].count(f"raid_fast: {toy_op} -> toy_fast") == 1


def test_explicit_backend_and_environment(toy_op, monkeypatch):
    assert _dispatch.call(toy_op, 3, backend="toy_ref") == ("toy_ref", 3)
    assert _dispatch.call(toy_op, 3, backend="toy_interp") == ("toy_interp", 3)
    monkeypatch.setenv("RAID_FAST_BACKEND", "toy_ref")
    assert _dispatch.call(toy_op, 3) == ("toy_ref", 3)
    # the argument wins over the environment
    assert _dispatch.call(toy_op, 3, backend="toy_fast") == ("toy_fast", 3)


def test_environment_skips_ops_without_that_backend(toy_op, monkeypatch):
    # a process-wide choice applies to the ops that have that backend; the others stay on auto
    monkeypatch.setenv("RAID_FAST_BACKEND", "cpp")
    assert _dispatch.call(toy_op, 3) == ("toy_fast", 3)


def test_prefer_is_soft(toy_op):
    assert _dispatch.call(toy_op, 3, prefer="toy_ref") == ("toy_ref", 3)
    # a preferred backend that cannot serve the call, or that the op lacks, falls back to auto
    assert _dispatch.call(toy_op, -3, prefer="toy_fast") == ("toy_ref", -3)
    assert _dispatch.call(toy_op, 3, prefer="toy_gpu") == ("toy_fast", 3)
    assert _dispatch.call(toy_op, 3, prefer="cpp") == ("toy_fast", 3)
    # an explicit backend still wins
    assert _dispatch.call(toy_op, 3, backend="toy_ref", prefer="toy_fast") == ("toy_ref", 3)


def test_explicit_backend_that_cannot_serve_raises_with_reasons(toy_op, monkeypatch):
    with pytest.raises(RuntimeError, match=r"backend 'toy_gpu' cannot serve this call: no GPU here.*toy_fast: ok"):
        _dispatch.call(toy_op, 3, backend="toy_gpu")
    with pytest.raises(RuntimeError, match=r"backend 'toy_fast' cannot serve this call: needs x > 0, got -2"):
        _dispatch.call(toy_op, -2, backend="toy_fast")
    with pytest.raises(RuntimeError, match=r"backend='cpp' has no toy_op_for_tests"):
        _dispatch.call(toy_op, 1, backend="cpp")
    monkeypatch.setenv("RAID_FAST_BACKEND", "nope")
    with pytest.raises(RuntimeError, match=r"RAID_FAST_BACKEND='nope' is not a registered backend"):
        _dispatch.call(toy_op, 1)


def test_explicit_backend_that_failed_to_import_reraises_the_error(toy_op, monkeypatch):
    error = ImportError("libtoy.so: cannot open shared object file")
    monkeypatch.setitem(_dispatch._IMPORT_ERRORS, "toy_broken", error)
    with pytest.raises(ImportError, match="libtoy.so") as info:
        _dispatch.call(toy_op, 1, backend="toy_broken")
    assert info.value is error
    # auto selection goes on without it, and the table says why it is missing
    assert _dispatch.call(toy_op, 1) == ("toy_fast", 1)
    assert "libtoy.so" in raid_fast.backends()[toy_op]["toy_broken"]


def test_unknown_op():
    with pytest.raises(RuntimeError, match="unknown op 'nope'"):
        _dispatch.call("nope")


def test_backends_table(toy_op):
    table = raid_fast.backends()
    assert table[toy_op] == {
        "toy_gpu": "no GPU here",
        "toy_interp": "ok (explicit requests only)",
        "toy_fast": "ok",
        "toy_ref": "ok",
    }
    for op in ("kmeans_assign", "kmeans_update", "kmeans_step", "kmeans_plusplus"):
        assert table[op]["torch"] == "ok"
        assert set(table[op]) >= {"torch", "cpp", "cuda"}
    # triton (when importable) runs only the half-precision Lloyd loop
    assert set(table["kmeans_update"]) == set(table["kmeans_plusplus"]) == {"torch", "cpp", "cuda"}
    assert set(table["kmeans_step"]) - {"torch", "cpp", "cuda"} <= {"triton"}


def test_every_schema_op_has_a_reference():
    from raid_fast.ops.schema import SCHEMAS

    table = raid_fast.backends()
    assert set(table) >= set(SCHEMAS)
    assert all(table[op]["torch"] == "ok" for op in SCHEMAS)


def test_broken_availability_check_is_a_reason_not_a_crash(toy_op):
    def boom():
        raise OSError("libfoo.so missing")

    _dispatch.add_backend(Backend("toy_gpu", 0, {toy_op: Impl(lambda x, y: ("toy_gpu", x))}, available=boom))
    assert _dispatch.call(toy_op, 1) == ("toy_fast", 1)
    assert "libfoo.so missing" in raid_fast.backends()[toy_op]["toy_gpu"]


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
