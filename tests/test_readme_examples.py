"""The README's neural-network example (issue 9, item 8) runs and does what it says."""
import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_nn_module_example_downweights_the_corrupted_samples():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    code = next(b for b in blocks if "functional_call" in b)
    namespace = {}
    exec(compile(code, "README nn.Module example", "exec"), namespace)
    final = namespace["result"].final
    assert final["weight_corrupted"] < 0.5 * final["weight_clean"]
    baseline = namespace["bilevel"].solve(namespace["CleanRegression"](), "lower-only", steps=300, lower_lr=0.5)
    assert final["val_loss"] < 0.25 * baseline.final["val_loss"]


def test_readme_documents_resume_and_user_problems():
    for phrase in ("bilevel resume", "problem=mymodule:MyProblem", "load_checkpoint", "weights_only=True",
                   "checkpoint_every", "batch=None", "step **length**", "threads"):
        assert phrase in README, phrase
