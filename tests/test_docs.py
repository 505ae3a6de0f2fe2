"""The manual builds with `mkdocs build --strict` and the README's links lead somewhere.

mkdocs.yml turns every link, anchor and nav problem into a warning, and `strict: true` makes a
warning fail the build, so a broken link in docs/ fails this test (and CI). README.md is not part of
the mkdocs site, so its relative links are checked here: the file must exist and, for a link into a
manual page with `#anchor`, the built page must carry that anchor.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

_FENCED_CODE = re.compile(r"^```.*?^```", re.S | re.M)
_LINK_TARGET = re.compile(r"\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")


def relative_links(markdown: str) -> list[str]:
    """Targets of inline links and images outside fenced code, without web, mail or in-page links."""
    text = _FENCED_CODE.sub("", markdown)
    targets = []
    for target in _LINK_TARGET.findall(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue
        targets.append(target)
    return targets


def build_site(site_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site_dir = tmp_path_factory.mktemp("site")
    result = build_site(site_dir)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return site_dir


@pytest.mark.integration   # mkdocs build --strict
def test_manual_builds_strict_with_every_page(site):
    pages = sorted(p.relative_to(ROOT / "docs") for p in (ROOT / "docs").rglob("*.md"))
    assert len(pages) >= 10
    for page in pages:
        html = site / ("index.html" if page.name == "index.md" else page.with_suffix("") / "index.html")
        assert html.is_file(), f"docs/{page} was not built to {html}"


@pytest.mark.integration   # mkdocs build --strict
def test_readme_relative_links_point_to_existing_files(site):
    targets = relative_links(README.read_text(encoding="utf-8"))
    assert any(t.startswith("docs/img/") for t in targets), "the README's figure is missing"
    assert len(targets) >= 10
    for target in targets:
        path, _, anchor = target.partition("#")
        assert (ROOT / path).exists(), f"README.md links to {target}, which does not exist"
        if anchor and path.startswith("docs/") and path.endswith(".md"):
            page = Path(path).relative_to("docs")
            html = site / ("index.html" if page.name == "index.md" else page.with_suffix("") / "index.html")
            assert f'id="{anchor}"' in html.read_text(encoding="utf-8"), f"README.md links to {target}: no such anchor"


def test_link_checker_sees_a_broken_link():
    broken = "See [the cache](docs/no-such-page.md) and ![fig](docs/img/x.png).\n```\n[skip](in-code.md)\n```\n"
    assert relative_links(broken) == ["docs/no-such-page.md", "docs/img/x.png"]
    assert relative_links("[web](https://example.org) [here](#install)") == []


def test_ci_runs_the_readme_test_command():
    readme_commands = [line for line in README.read_text(encoding="utf-8").splitlines()
                       if "python -m pytest" in line and line.startswith("python3 -m venv")]
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert len(readme_commands) == 1
    assert readme_commands[0] in ci_lines
