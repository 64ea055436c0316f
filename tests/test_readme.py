"""The README's Python quickstart runs as written (with a shorter Trainer)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_with_the_two_commands():
    first_block = README.read_text().split("```")[1]
    assert [line.split("#")[0].strip() for line in first_block.splitlines()[1:] if line.strip()] == [
        "make run",
        "make test",
    ]


def test_readme_quickstart_runs(tmp_path, monkeypatch):
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    short = 'L.Trainer(max_epochs=1, limit_train_batches=3, limit_test_batches=1, precision="bf16-mixed", ' \
            "enable_progress_bar=False, logger=False, enable_checkpointing=False)"
    assert 'L.Trainer(max_epochs=3, precision="bf16-mixed")' in code
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code.replace('L.Trainer(max_epochs=3, precision="bf16-mixed")', short), "README.md", "exec"), scope)
    cohort = scope["module"].cohort
    # after average + broadcast(0) every member equals member 0
    for i in range(1, len(cohort)):
        for a, b in zip(cohort[0].parameters(), cohort[i].parameters()):
            assert a.equal(b)
    assert set(scope["state"]) == set(cohort[2].state_dict())
