"""A non-editable install carries every data file: build the wheel offline and read its file list."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory):
    """Build a wheel from a copy of the source (so the checkout gets no build/ or egg-info) and list it.

    The copy also gets a web-app template and a static file, which package-data must carry as soon as
    neurolens/serve/ has them."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    shutil.copytree(ROOT / "neurolens", src / "neurolens",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for extra in ("serve/templates/test_page/unit.html", "serve/static/test_assets/app.css"):
        target = src / "neurolens" / extra
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("/* placed by tests/test_install.py */\n")
    out = work / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    wheels = list(out.glob("neurolens-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as archive:
        return set(archive.namelist())


@pytest.mark.integration   # builds the wheel
def test_wheel_carries_every_data_file(wheel_files):
    data_dir = ROOT / "neurolens" / "data"
    expected = {f"neurolens/data/{p.relative_to(data_dir).as_posix()}" for p in data_dir.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}
    assert "neurolens/data/model_configs/nl-tiny-RN.json" in expected  # the files the demo and tests need
    missing = sorted(expected - wheel_files)
    assert not missing, f"the wheel lacks {missing}"


@pytest.mark.integration   # builds the wheel
def test_wheel_carries_web_templates_and_static_files(wheel_files):
    assert "neurolens/serve/templates/test_page/unit.html" in wheel_files
    assert "neurolens/serve/static/test_assets/app.css" in wheel_files


@pytest.mark.integration   # builds the wheel
def test_wheel_carries_every_module(wheel_files):
    modules = {f"neurolens/{p.relative_to(ROOT / 'neurolens').as_posix()}"
               for p in (ROOT / "neurolens").rglob("*.py") if "__pycache__" not in p.parts}
    assert not sorted(modules - wheel_files)


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _distribution_names(requirements) -> set:
    import re
    return {re.split(r"[<>=!~ ;\[]", r.strip(), maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def _third_party_imports() -> dict:
    """{top-level module: files} for every import statement under neurolens/, function-level ones included."""
    import ast
    found: dict = {}
    for path in (ROOT / "neurolens").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "neurolens" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(path.relative_to(ROOT).as_posix())
    return found


def test_every_import_is_a_declared_dependency():
    from importlib.metadata import packages_distributions
    project = _pyproject()["project"]
    runtime = _distribution_names(project["dependencies"])
    extras = {name: _distribution_names(reqs) for name, reqs in project["optional-dependencies"].items()}
    optional = {"nudenet": "nudenet",   # imported only by neurolens/labels/nudenet.py, which checks for it first
                # --engine ray: imported only inside neurolens/engines/ray/ (session.import_ray checks for it first)
                "ray": "ray"}
    imports = _third_party_imports()
    assert {"torch", "open_clip", "scipy"} <= set(imports)
    installed = packages_distributions()   # reads every installed distribution's metadata: once
    for module, files in sorted(imports.items()):
        distributions = installed.get(module)
        assert distributions, f"{module} (imported by {sorted(files)}) is not installed"
        names = {d.lower().replace("_", "-") for d in distributions}
        declared = extras[optional[module]] if module in optional else runtime
        assert names & declared, f"{module} (imported by {sorted(files)}) is not declared in pyproject.toml"


def test_lucent_and_kornia_are_extras_that_neurolens_never_imports():
    project = _pyproject()["project"]
    assert not {"lucent", "kornia"} & set(_third_party_imports())
    assert not {"torch-lucent", "kornia"} & _distribution_names(project["dependencies"])
    for extra in ("test", "lucent"):
        assert {"torch-lucent", "kornia"} <= _distribution_names(project["optional-dependencies"][extra])
    for requirement in project["dependencies"]:   # no upper pins on anything
        assert "<" not in requirement and "==" not in requirement, requirement


def test_sae_lens_is_a_pinned_test_extra_that_neurolens_never_imports():
    """tests/test_saelens.py checks the SAE format against one SAELens release: pinned, in the extra CI installs."""
    assert "sae_lens" not in _third_party_imports()
    project = _pyproject()["project"]
    pins = [r for r in project["optional-dependencies"]["test"] if _distribution_names([r]) == {"sae-lens"}]
    assert len(pins) == 1 and "==" in pins[0], pins
    assert "sae-lens" not in _distribution_names(project["dependencies"])


def test_a_bare_install_has_the_web_apps_packages():
    """The README's install line (`pip install -e .`) must give a working `neurolens serve`: the web app's packages
    are base dependencies (the `serve` extra keeps naming them for `pip install neurolens[serve]`)."""
    project = _pyproject()["project"]
    web = {"starlette", "uvicorn", "httptools", "uvloop"}
    assert web <= _distribution_names(project["dependencies"])
    assert web <= _distribution_names(project["optional-dependencies"]["serve"])
