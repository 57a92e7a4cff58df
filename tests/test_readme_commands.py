"""The README's two commands are what CI runs, character for character; its example runs."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The commands of the README's first bash block, without their trailing comments."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md has no ```bash block"
    return [re.sub(r"\s+#.*$", "", line).strip() for line in block.group(1).splitlines() if line.strip()]


def ci_commands() -> list[str]:
    """The lines of .ci/run that follow its "# README command N" markers."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [lines[i + 1].strip() for i, line in enumerate(lines) if line.startswith("# README command")]


def test_readme_starts_with_install_demo_and_test_commands():
    install_demo, tests = readme_commands()
    assert "pip install" in install_demo and install_demo.endswith("python examples/quickstart.py")
    assert "pip install" in tests and tests.endswith("python -m pytest -q")


def test_ci_runs_exactly_the_readme_commands_in_a_new_venv():
    assert ci_commands() == readme_commands()
    script = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv" in script and "mktemp -d" in script  # from nothing, every time
    assert script.index("source") < script.index("# README command 1")


@pytest.mark.slow  # parses the Wikipedia articles, calibrates with the wisparse method, compiles: minutes
def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    """The README's ten-line example, on a tiny random Llama instead of SmolLM2."""
    code = re.search(r"## Ten lines\n\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert 'load_causal_lm("smollm2")' in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace('load_causal_lm("smollm2")', 'load_causal_lm("random:llama")'), "README.md", "exec"), {})
    assert (tmp_path / "plan.wsp").is_file()
    assert "14 sparse" in capsys.readouterr().out  # every decoder linear of the 2-layer model
