"""vhost/descriptors.py: the vhost-user back-end descriptors (QEMU's vhost-user.json,
``VhostUserBackend``) of every registered device, installed into a directory.

Every test installs into its own temporary directory; the one test that needs the
system directory (libvirt reading it) is tests/libvirt/test_libvirt_descriptors.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.daemon import this_tree_env
from vhost import descriptors, registry
from vhost.descriptors import DescriptorError, check_capabilities, check_descriptor

NAMES = registry.names()


def install(directory: Path, *args: str) -> int:
    return descriptors.main(["--dir", str(directory), *args])


def test_one_valid_file_per_device_whose_binary_prints_its_capabilities(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "vhost-user"  # made by install
    assert install(d) == 0
    files = sorted(p.name for p in d.iterdir())
    assert files == sorted(f"50-vhost-py-{n}.json" for n in NAMES)
    for name in NAMES:
        path = d / f"50-vhost-py-{name}.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        doc = json.loads(path.read_text())
        check_descriptor(doc)
        device_type = registry.load(name)
        assert doc["type"] == device_type.backend_type
        assert Path(doc["binary"]).name == device_type.program
        assert os.path.isabs(doc["binary"]) and os.access(doc["binary"], os.X_OK)
        # what management software does with it (libvirt, for a gpu back end)
        r = subprocess.run(
            [doc["binary"], "--print-capabilities"], capture_output=True, text=True, check=True
        )
        assert json.loads(r.stdout) == device_type.capabilities()
    out = capsys.readouterr().out
    assert out.count("installed ") == len(NAMES), out


def test_the_devices_types_are_schema_backend_types() -> None:
    """blk is "block", net "net", rng "rng": VHostUserBackendType's names."""
    types = {n: registry.load(n).backend_type for n in NAMES}
    assert {"blk": "block", "net": "net", "rng": "rng"}.items() <= types.items()
    assert set(types.values()) <= set(descriptors.BACKEND_TYPES)


def test_the_binary_is_the_one_beside_this_python() -> None:
    """A console script of this environment, not a shim earlier on PATH (pyenv's run
    whichever Python the caller's environment picks)."""
    for name in NAMES:
        program = registry.load(name).program
        beside = Path(sys.executable).with_name(program)
        if beside.exists():
            assert descriptors.find_binary(program) == os.path.abspath(beside)


def test_dry_run_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "vhost-user"
    assert install(d, "--dry-run") == 0
    assert not d.exists()
    out = capsys.readouterr().out
    for name in NAMES:
        assert f"would write {d}/50-vhost-py-{name}.json" in out
    # the JSON it shows is the JSON it would write
    first = out.split(":\n", 1)[1].split("would write")[0]
    check_descriptor(json.loads(first))


def test_install_again_replaces_ours_and_leaves_the_rest(tmp_path: Path) -> None:
    theirs = tmp_path / "50-qemu-virtiofsd.json"
    theirs.write_text('{"description": "x", "type": "fs", "binary": "/usr/lib/qemu/virtiofsd"}')
    stale = tmp_path / "50-vhost-py-blk.json"
    stale.write_text("{not json")
    assert install(tmp_path) == 0
    assert install(tmp_path) == 0
    check_descriptor(json.loads(stale.read_text()))
    assert theirs.read_text().startswith('{"description": "x"')
    names = sorted(p.name for p in tmp_path.iterdir())  # no temporary file left
    assert names == sorted(["50-qemu-virtiofsd.json", *(f"50-vhost-py-{n}.json" for n in NAMES)])


def test_uninstall_removes_ours_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    theirs = tmp_path / "50-qemu-virtiofsd.json"
    theirs.write_text("{}")
    other = tmp_path / "60-vhost-py-blk.json"  # not our prefix
    other.write_text("{}")
    assert install(tmp_path) == 0
    assert install(tmp_path, "--uninstall", "--dry-run") == 0
    assert len(descriptors.installed(tmp_path)) == len(NAMES)
    assert install(tmp_path, "--uninstall") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [theirs.name, other.name]
    assert install(tmp_path, "--uninstall") == 0  # nothing left to remove: no error
    assert "no 50-vhost-py-*.json in" in capsys.readouterr().out


def test_a_missing_binary_fails_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = descriptors.find_binary
    monkeypatch.setattr(
        descriptors, "find_binary", lambda p: None if p == "vhost-user-rng" else real(p)
    )
    assert install(tmp_path) == 1
    assert list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err
    assert err.startswith("python -m vhost install-descriptors: error: vhost-user-rng is not")


def test_an_unwritable_directory_is_one_line_and_status_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert install(blocker / "vhost-user") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err, err


def test_bad_arguments_are_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        descriptors.main(["--no-such-option"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("python -m vhost install-descriptors: error:")


GOOD = {"description": "d", "type": "block", "binary": "/usr/bin/x"}


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        ([], "a JSON object"),
        ({**GOOD, "features": ["read-only"]}, "not in VhostUserBackend: ['features']"),
        ({k: v for k, v in GOOD.items() if k != "binary"}, "missing members: ['binary']"),
        ({**GOOD, "type": "blk"}, "'blk' is not a VHostUserBackendType"),
        ({**GOOD, "binary": "bin/x"}, "'bin/x' is not an absolute path"),
        ({**GOOD, "description": 1}, "description must be a string"),
        ({**GOOD, "tags": "a"}, "tags must be a list of strings"),
    ],
)
def test_check_descriptor_refuses_what_the_schema_does(doc: object, why: str) -> None:
    with pytest.raises(DescriptorError) as e:
        check_descriptor(doc)
    assert why in str(e.value)


def test_check_descriptor_takes_the_schema_example() -> None:
    check_descriptor(
        {
            "description": "QEMU vhost-user-gpu",
            "type": "gpu",
            "binary": "/usr/libexec/qemu/vhost-user-gpu",
            "tags": ["CONFIG_OPENGL_DMABUF=y"],
        }
    )


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ('echo \'{"type": "net"}\'', "expected type 'block'"),
        ("echo not json", "printed no JSON"),
        ("echo '[\"block\"]'", "expected type 'block'"),
        ("echo oops >&2; exit 3", "exited 3: oops"),
    ],
)
def test_check_capabilities_refuses_a_binary_that_answers_wrong(
    tmp_path: Path, body: str, why: str
) -> None:
    binary = tmp_path / "backend"
    binary.write_text(f"#!/bin/sh\n{body}\n")
    binary.chmod(0o755)
    with pytest.raises(DescriptorError) as e:
        check_capabilities(str(binary), "block")
    assert why in str(e.value)
    with pytest.raises(DescriptorError, match="No such file"):
        check_capabilities(str(tmp_path / "missing"), "block")


def test_the_module_runs_as_a_program(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "vhost.descriptors", "--dir", str(tmp_path), "--dry-run"],
        capture_output=True,
        text=True,
        env={**os.environ, **this_tree_env()},
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("would write ") == len(NAMES)


def test_python_m_vhost_install_descriptors_is_this_command(tmp_path: Path) -> None:
    """The subcommand vhost/cli.py hands to :func:`descriptors.main`."""
    d = tmp_path / "vhost-user"
    r = subprocess.run(
        [sys.executable, "-m", "vhost", "install-descriptors", "--dir", str(d)],
        capture_output=True,
        text=True,
        env={**os.environ, **this_tree_env()},
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in d.iterdir()) == sorted(f"50-vhost-py-{n}.json" for n in NAMES)
