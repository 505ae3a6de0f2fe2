"""The layout in docs/development.md holds in the code: no import points up its table, no module is over 450
lines, no import cycle (imports inside functions count), and package __init__ files re-export nothing."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "neurolens"


def _modules():
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return found


MODULES = _modules()


def _imports(name, path):
    """Every neurolens module the module imports, anywhere in it."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".") if is_package else name.split(".")[:-1]
                prefix = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target


def _rows():
    """The table's first column, top to bottom: lists of module prefixes (`labels/` rows name their modules)."""
    text = (ROOT / "docs" / "development.md").read_text()
    section = text.split("## The layout", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = line.split("|")
        if len(cells) < 3 or not cells[1].strip().startswith("`"):
            continue
        names = [n.strip("/").removesuffix(".py") for n in re.findall(r"`([^`]+)`", cells[1])]
        if "(" in cells[1]:            # a package split in two rows: its modules are named in the job column
            package = names[0]
            names = [f"{package}.{m.removesuffix('.py')}" for m in re.findall(r"`([a-z_]+\.py)`", cells[2])]
        rows.append(names)
    return rows


def _row_of(module, rows):
    relative = module.split(".", 1)[1] if "." in module else ""
    best = None
    for index, names in enumerate(rows):
        for prefix in names:
            if relative == prefix or relative.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
            elif prefix.startswith(relative + "."):      # the __init__ of a package split over two rows: the lower
                best = (index, 0) if best is None or best[1] == 0 else best
    return None if best is None else best[0]


def test_the_table_names_every_package():
    rows = _rows()
    assert len(rows) >= 10
    for module in MODULES:
        if module in ("neurolens", "neurolens.__main__"):
            continue
        assert _row_of(module, rows) is not None, f"{module} is in no row of the layout table"


def test_no_import_points_up_the_table():
    rows = _rows()
    upward = []
    for module, path in MODULES.items():
        if module in ("neurolens", "neurolens.__main__"):      # the public API and the entry point
            continue
        for target in _imports(module, path):
            if _row_of(target, rows) < _row_of(module, rows):
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_modules_are_short_and_packages_re_export_nothing():
    long = [f"{m} ({n} lines)" for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 450]
    assert long == []
    # neurolens.cli's __init__ imports its command modules to register them; nothing else re-exports
    exporting = [m for m, p in MODULES.items() if p.name == "__init__.py" and m not in ("neurolens", "neurolens.cli")
                 and any(isinstance(node, ast.ImportFrom) and node.level for node in ast.parse(p.read_text()).body)]
    assert exporting == []


def test_no_import_cycle():
    graph = {module: set(_imports(module, path)) for module, path in MODULES.items()}
    graph["neurolens"] = set()          # the public API imports lazily, by name
    state, cycles = {}, []

    def visit(module, stack):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert cycles == []
