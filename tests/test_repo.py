"""Repository promises: CI runs exactly the README's test command; installed names stay namespaced."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(python3 -m venv .*?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_exactly_the_readme_test_command():
    commands = readme_commands()
    assert len(commands) == 2, commands
    tests_command = next(c for c in commands if "pytest" in c)
    assert tests_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_installed_packages_live_under_the_tttkd_namespace():
    import tttkd.cli
    import tttkd.pipeline

    assert Path(tttkd.pipeline.__file__).parent.name == "pipeline"
    text = (ROOT / "pyproject.toml").read_text()
    packages = re.search(r"packages = \[(.*?)\]", text).group(1)
    assert all(name.strip().strip('"').startswith("tttkd") for name in packages.split(","))
