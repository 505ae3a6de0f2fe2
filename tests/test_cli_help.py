"""Every command has help with an example; the package API never imports the CLI libraries."""
import subprocess
import sys

from typer.testing import CliRunner

from neurolens.cli import app


def _commands():
    import typer.main
    group = typer.main.get_command(app)
    return group, sorted(group.commands)


def test_every_command_has_help_with_an_example():
    group, names = _commands()
    assert "layers" in names and "visualize" in names
    runner = CliRunner()
    for name in names:
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Example" in result.output and f"neurolens {name}" in result.output, name


def test_python_api_does_not_import_cli_libraries():
    code = "import sys, neurolens; print('typer' in sys.modules or 'rich' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_python_dash_m_runs():
    out = subprocess.run([sys.executable, "-m", "neurolens", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "visualize" in out.stdout
