import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parent.parent


def readme_commands():
    text = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_ci_runs_readme_test_command():
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines == [readme_commands()[1]]


def test_readme_main_command_trains_on_shared_omniglot():
    main_command = readme_commands()[0]
    assert "keras-xbm train --dataset omniglot --data-dir ../shared/data/omniglot" in main_command
    assert main_command.startswith("python3 -m venv .venv && .venv/bin/pip install .")
