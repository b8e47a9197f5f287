"""CI proves the README: .ci/run runs the README's test command, and the README's commands exist."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    blocks = _bash_blocks(readme)
    assert len(blocks) >= 2
    main_job, tests = blocks[0].strip(), blocks[1].strip()
    ci_lines = [ln for ln in (REPO / ".ci/run").read_text().splitlines() if ln and not ln.startswith("#")]
    assert tests in ci_lines, "the README's test command must be the one .ci/run runs"
    assert "torchrun --nproc-per-node 4 -m dtrain.cli train configs/" in main_job
    config = main_job.split("dtrain.cli train ")[1].split()[0]
    assert (REPO / config).is_file()


def test_readme_example_names_real_api():
    from dtrain.algorithms import DDP, DiLoCo  # noqa: F401
    from dtrain.comm.torch_backend import TorchComm  # noqa: F401

    readme = (REPO / "README.md").read_text()
    for path in re.findall(r"(launchers/[\w.]+|configs/[\w.]+\.yaml)", readme):
        assert (REPO / path).exists(), path
