"""The package's public surface: every exported name resolves, and importing it stays cheap."""

import subprocess
import sys

import fd_onestep


def test_every_public_name_resolves_to_an_object():
    for name in fd_onestep.__all__:
        assert getattr(fd_onestep, name) is not None, name


def test_unknown_attribute_is_an_attribute_error():
    try:
        fd_onestep.not_a_name  # noqa: B018
    except AttributeError as err:
        assert "not_a_name" in str(err)
    else:
        raise AssertionError("expected AttributeError")


def test_importing_the_package_does_not_import_diffusers_or_transformers():
    code = "import sys, fd_onestep; print('diffusers' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
