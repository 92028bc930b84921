"""The README's example and set-up commands stay true."""
import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_example_runs_and_tunes_the_penalties(capsys):
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    namespace = {}
    exec(compile(code, "README example", "exec"), namespace)
    tuned = namespace["result"].final["val_loss"]
    problem = namespace["RidgeHPO"]()
    x0, y0 = problem.init(None)
    untuned = namespace["bilevel"].solve(problem, "lower-only", steps=300, lower_lr=0.1).final["val_loss"]
    assert tuned < 0.5 * untuned


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, re.S)
    assert len(commands) == 2 and commands[0].endswith("bilevel run") and "pytest" in commands[1]
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert commands[1] in ci
