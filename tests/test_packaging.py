"""pyproject.toml: what `pip install .` installs agrees with the repository.

The install itself, in fresh virtual environments, is .ci/install_check.py (a
minute or two of downloads; CI runs it after the suite)."""

import os
import re
import tomllib

import flags as cli
from conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# What only the tests and the docs import: the test and docs extras, not `pip install .`.
TEST_ONLY = {"cleverhans", "h5py", "hypothesis", "pytest", "pytest-xdist", "tritonclient"}
DOCS_ONLY = {"mkdocs-material", "mkdocstrings"}


def requirements(name):
    lines = [line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines()]
    return [line for line in lines if line]


def project_name(requirement):
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()


def test_pyproject_has_requirements_txts_dependencies():
    lines = requirements("requirements.txt")
    runtime = [r for r in lines if project_name(r) not in TEST_ONLY | DOCS_ONLY]
    tests = [r for r in lines if project_name(r) in TEST_ONLY]
    docs = [r for r in lines if project_name(r) in DOCS_ONLY]
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert sorted(PYPROJECT["project"]["dependencies"]) == sorted(runtime)
    assert sorted(extras["test"]) == sorted(tests)
    assert sorted(extras["docs"]) == sorted(docs)
    assert {project_name(r) for r in tests} == TEST_ONLY
    assert {project_name(r) for r in docs} == DOCS_ONLY
    assert PYPROJECT["project"]["license"] == "Apache-2.0"


def test_the_library_and_the_command_line_import_nothing_only_the_tests_have():
    """`pip install .` leaves out the test extra: no module the package installs
    may import it."""
    code = "\n".join((ROOT / p).read_text() for p in ["main.py"] + [
        str(f.relative_to(ROOT)) for d in ("ardir_tf", "export", "flags")
        for f in (ROOT / d).glob("*.py")])
    imported = set(re.findall(r"^\s*(?:from|import) (\w+)", code, re.M))
    assert not imported & {"cleverhans", "h5py", "hypothesis", "pytest", "tritonclient",
                            "mkdocs"}


def test_the_serving_requirements_are_requirements_txts_without_tensorflow():
    serve = requirements("requirements-serve.txt")
    assert set(serve) <= set(requirements("requirements.txt"))
    assert not {project_name(r) for r in serve} & {"tensorflow", "keras", "tf2onnx",
                                                    "tensorflow-datasets"}
    assert {project_name(r) for r in serve} >= {"onnxruntime", "aiohttp", "absl-py",
                                                 "prometheus_client", "numpy"}


def test_every_package_the_commands_import_is_installed_whole():
    setuptools = PYPROJECT["tool"]["setuptools"]
    assert setuptools["py-modules"] == ["main"]
    for package in setuptools["packages"]:
        assert (ROOT / package.replace(".", "/") / "__init__.py").is_file()
        subpackages = [d for d in (ROOT / package.replace(".", "/")).iterdir()
                       if (d / "__init__.py").is_file()
                       and f"{package}.{d.name}" not in setuptools["packages"]]
        assert not subpackages, f"{subpackages} would not be installed"
    imported = set(re.findall(r"^\s*(?:from|import) (\w+)",
                              (ROOT / "main.py").read_text() +
                              (ROOT / "export" / "cli.py").read_text(), re.M))
    local = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert imported & local <= set(setuptools["packages"])
    assert setuptools["package-data"]["flags"] == ["*.cfg"]


def test_the_console_scripts_name_functions_that_exist():
    import importlib
    for name, target in PYPROJECT["project"]["scripts"].items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name
    assert set(PYPROJECT["project"]["scripts"]) == {"ardir-tf", "ardir-serve"}


def test_preset_flagfiles_are_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flags").mkdir()
    (tmp_path / "flags" / "mine.cfg").write_text("--epochs=1\n")
    argv = ["ardir-tf", "--flagfile=flags/smoke.cfg", "--flagfile=flags/mine.cfg",
            "--flagfile=./flags/cifar10.cfg", "--flagfile=flags/nope.cfg", "--epochs=2"]
    assert cli.resolve_flagfiles(argv) == [
        "ardir-tf", f"--flagfile={os.path.join(cli.PRESETS, 'smoke.cfg')}",
        "--flagfile=flags/mine.cfg",  # the user's own file wins
        f"--flagfile={os.path.join(cli.PRESETS, 'cifar10.cfg')}",
        "--flagfile=flags/nope.cfg",  # absl then says it is missing
        "--epochs=2"]

