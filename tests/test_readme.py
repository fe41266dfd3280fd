import re
import subprocess
import sys

from conftest import REPO


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (REPO / "README.md").read_text(), re.S)


def test_ci_runs_exactly_the_readme_test_command():
    test_command = next(c for c in readme_commands() if "pytest" in c)
    assert test_command in (REPO / ".ci" / "run").read_text().splitlines()


def test_cli_help_and_version():
    out = subprocess.run([sys.executable, "-m", "showtell", "--help"], capture_output=True, text=True, check=True)
    assert "caption" in out.stdout or "data" in out.stdout
    out = subprocess.run([sys.executable, "-m", "showtell", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("showtell ")
