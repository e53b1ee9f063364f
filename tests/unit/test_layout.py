"""The project's shape, as rules a change can break: the core knows no device, every
device is a package of its own that the registry finds, and the typed stubs of the
compiled modules are what c_ext/stubgen.py writes from their declarations today."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from vhost import registry
from vhost.device import DeviceType

ROOT = Path(__file__).resolve().parents[2]
DEVICE_DIRS = sorted(p.parent for p in (ROOT / "devices").glob("*/__init__.py"))


def imports_of(path: Path) -> set[str]:
    """Every module a Python file imports (absolute names)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_the_core_imports_no_device() -> None:
    offenders = {
        str(p.relative_to(ROOT)): sorted(m for m in imports_of(p) if m.split(".")[0] == "devices")
        for p in (ROOT / "vhost").glob("**/*.py*")
        if p.suffix in (".py", ".pyi")  # not the bytecode a run may leave in __pycache__
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_core_c_holds_no_device() -> None:
    names = {p.name for p in (ROOT / "c_ext").iterdir()}
    assert not any(n.startswith(("blk", "net", "rng")) for n in names), names
    for source in (ROOT / "c_ext").glob("*.[ch]"):
        text = source.read_text()
        assert "virtio_blk" not in text.lower() and "net_" not in text, source


@pytest.mark.parametrize("folder", DEVICE_DIRS, ids=lambda p: p.name)
def test_every_device_folder_is_a_registered_device(folder: Path) -> None:
    """Each devices/NAME is one package: registered under its name, its DeviceType
    found by the registry, its console script pointing at the same package."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    entry = project["entry-points"]["vhost.devices"]
    assert entry.get(folder.name) == f"devices.{folder.name}:DEVICE"
    device_type = registry.load(folder.name)
    assert isinstance(device_type, DeviceType) and device_type.name == folder.name
    script = project["scripts"].get(device_type.program)
    assert script == f"devices.{folder.name}:main", device_type.program
    assert folder.name in registry.names()


def test_a_device_builds_its_own_c_if_it_has_any() -> None:
    """A device with C sources has a build script of its own (setup.py finds it); its
    compiled module lives in its package."""
    for folder in DEVICE_DIRS:
        if any(folder.glob("*.c")):
            assert (folder / "build.py").exists(), folder
            assert list(folder.glob(f"_{folder.name}*.so")), f"{folder}: not built"


def _tests_of(module_name: str, names: list[str]) -> list[str]:
    """The tests named in a ROWS entry that do not exist (``module::func`` or ``func``
    in ``module_name``)."""
    missing = []
    for name in names:
        module, _, func = name.rpartition("::")
        where = importlib.import_module(module or module_name)
        if not callable(getattr(where, func, None)):
            missing.append(name)
    return missing


@pytest.mark.parametrize(
    "folder", [d for d in DEVICE_DIRS if (d / "limits.py").exists()], ids=lambda p: p.name
)
def test_every_bound_of_a_device_has_tests(folder: Path) -> None:
    """Each row of a device's bounds table (its limits.py) names tests: in
    tests/unit/test_limits.py's ROWS, or in the device's own tests/test_limits.py ROWS."""
    from tests.unit import test_limits

    limits = importlib.import_module(f"devices.{folder.name}.limits")
    named = {row: (test_limits.__name__, tests) for row, tests in test_limits.ROWS.items()}
    if (folder / "tests" / "test_limits.py").exists():
        own = importlib.import_module(f"devices.{folder.name}.tests.test_limits")
        named.update({row: (own.__name__, tests) for row, tests in own.ROWS.items()})
    rows = [bound for bound, _value, _where in test_limits.table_rows(limits)]
    assert rows, f"{folder.name}/limits.py has no table"
    assert [r for r in rows if r not in named] == []
    for row in rows:
        module_name, tests = named[row]
        assert tests and _tests_of(module_name, tests) == [], row


def test_the_typed_stubs_are_current() -> None:
    spec = importlib.util.spec_from_file_location("stubgen", ROOT / "c_ext" / "stubgen.py")
    assert spec is not None and spec.loader is not None
    stubgen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stubgen)
    stale = []
    for build, ffi in stubgen.builds():
        path = stubgen._stub_path(stubgen._module_name(ffi))
        if not path.exists() or path.read_text() != stubgen.render(build, ffi):
            stale.append(str(path.relative_to(ROOT)))
    assert stale == [], "run: python c_ext/stubgen.py"


def test_python_m_vhost_lists_every_device() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vhost"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    for folder in DEVICE_DIRS:
        assert f"  {folder.name} " in out, out


def test_python_m_vhost_refuses_an_unknown_device() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "vhost", "no-such-device"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert r.returncode == 2 and r.stdout == ""
    assert "no device 'no-such-device' is registered" in r.stderr
    assert "Traceback" not in r.stderr
