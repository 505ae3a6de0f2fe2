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


def test_commands_are_listed_in_workflow_order_with_one_line_summaries():
    import typer.main
    group = typer.main.get_command(app)
    listed = group.list_commands(None)
    workflow = ["demo", "visualize", "scan", "samples", "text", "sweep", "figure", "grid", "similarity",
                "audit-captions", "train-toy"]
    assert [name for name in listed if name in workflow] == workflow
    assert sorted(listed) == sorted(group.commands)
    for name in listed:
        summary = group.commands[name].short_help
        assert summary and "\n" not in summary and len(summary) <= 100, name


def test_option_sets_replace_their_parameter_in_place():
    import inspect

    from neurolens.cli.options import DATASET, MODEL, DatasetChoice, ModelChoice, uses

    seen = {}

    @uses(model=MODEL.with_defaults(pretrained="none"), data=DATASET.without("caption_column"))
    def job(layer: str = "x", model: ModelChoice = None, data: DatasetChoice = None, flag: bool = False):
        seen.update(layer=layer, model=model, data=data, flag=flag)

    names = list(inspect.signature(job).parameters)
    assert names == ["layer", "model", "pretrained", "checkpoint", "device", "dataset", "image_column", "flag"]
    job(layer="y", model="m", pretrained="none", checkpoint=None, device="cpu", dataset="d", image_column="img",
        flag=True)
    assert seen == dict(layer="y", model=ModelChoice("m", "none", None, "cpu"),
                        data=DatasetChoice("d", "img", "caption"), flag=True)


def test_json_output_writes_nan_and_infinity_as_null(capsys):
    import json

    import numpy as np

    from neurolens.cli.app import print_json
    print_json({"a": float("nan"), "b": [np.float32("inf"), np.int64(3), 1.5], "c": np.array([np.nan, 2.0]),
                "d": (True, None, "x")})
    out = capsys.readouterr().out
    assert "NaN" not in out and "Infinity" not in out
    assert json.loads(out) == {"a": None, "b": [None, 3, 1.5], "c": [None, 2.0], "d": [True, None, "x"]}
