"""Every command in the README's ```bash blocks runs exactly as printed, or is listed below with its reason.

Commands are taken from the bash blocks (continuation lines joined, ``#`` comments dropped,
``a && b`` split into its parts) and run in README order in one empty folder, so later
commands see the files earlier ones wrote (``score seven.png`` after ``-o seven.png``).
``.venv/bin/`` is this test's environment. Nothing reaches the network: ``HF_HUB_OFFLINE=1``.

A new README command therefore either runs here, or needs an entry in ``NOT_RUN`` (a
pattern and why it cannot run here) or ``SLOW`` (runs with ``pytest -m slow``); a pattern
that matches no README command any more is an error too, so the lists stay true.
The ```python blocks are held to the same rule with ``PYTHON_NOT_RUN``.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

NOT_RUN = [
    (r"^python3 -m venv ", "creates the environment this test already runs in"),
    (r"pip install", "installs from the package registry (network, minutes)"),
    (r"^\.venv/bin/pytest", "the test suite itself"),
    (r"^starflow generate 'a film still", "downloads apple/starflow (3B weights, network); the same code path "
                                         "runs offline in tests/test_hub.py on a fake hub"),
    (r"ckpts/starflow_3B", "needs the upstream checkpoint and YAML (network)"),
    (r"--model apple/starflow-v ", "downloads STARFlow-V (7B weights, network); tests/test_video_pipeline.py runs the "
                                   "same commands on a tiny video model, and offline from a fake hub"),
    (r"--from-metadata corgi\.mp4", "needs corgi.mp4 from the STARFlow-V command above it"),
    (r"starflow-v_7B_t2v_caus_480p", "needs the STARFlow-V checkpoint and YAML (network)"),
    (r"\bmy-model\b", "stands for the reader's own model folder"),
    (r"\bmy-starflow-v\b", "stands for the reader's own converted STARFlow-V folder (tests/test_coreml_video.py "
                            "exports a tiny one)"),
    (r"^starflow coreml-video starflow-v-coreml ", "drives the export of the reader's STARFlow-V folder above "
                                                   "(tests/test_coreml_video.py runs it on a tiny export with "
                                                   "--interpreter)"),
    (r"--data path/to/folder", "stands for the reader's own image folder"),
    (r"^starflow quantize demo --report", "measured 14 minutes on 2 cores under load (tests/test_quantize.py runs it "
                                         "small)"),
    (r"^starflow train .*--steps (2000|2500|4000|15000)", "trains for 15 minutes or more on a CPU "
                                                     "(tests/test_training.py and tests/test_video_demo.py train small)"),
    (r"\bstarflow serve\b", "serves until stopped (tests/test_serve.py starts the same app on a free port)"),
    (r"^curl ", "needs the server above running (tests/test_serve.py sends the same requests)"),
    (r"--image three\.png", "needs three.png from the README's Python block above (bash and Python blocks run apart); "
                            "that block makes the same call"),
    (r"^mlx\.distributed_config ", "configures the network of several Macs over ssh"),
    (r"^mlx\.launch --hostfile ", "needs several Macs (tests/test_distributed.py runs the same code on two local ranks)"),
]
PYTHON_NOT_RUN = [
    (r"OpenAI\(base_url=", "needs a running `starflow serve`; tests/test_serve.py makes the same call against one"),
    (r'VideoPipeline\.from_pretrained\("starflow-v"\)', "needs a converted STARFlow-V folder (7B weights); "
                                                        "tests/test_video_pipeline.py makes the same calls on a "
                                                        "tiny video model"),
]
SLOW = [
    r"^starflow export-coreml demo ",  # about a minute on 2 cores
    r"^starflow export-coreml demo-video ",  # about 30 s: --verify runs three clips through the interpreter
    r"^starflow coreml-video demo-video-coreml ",  # needs the export above
    r"^starflow train --data digits --output \S+ --steps 20$",  # the README's timing measurement: minutes
]


def readme_commands() -> list[str]:
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            part: list[str] = []
            for word in shlex.split(line, comments=True) + ["&&"]:
                if word != "&&":
                    part.append(word)
                elif part:
                    commands.append(shlex.join(part))  # quoted as shlex quotes: 'a cat', not "a cat"
                    part = []
    return commands


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def reason_not_run(command: str) -> str | None:
    return next((why for pattern, why in NOT_RUN if re.search(pattern, command)), None)


def is_slow(command: str) -> bool:
    return any(re.search(pattern, command) for pattern in SLOW)


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1",
           "STARFLOW_MLX_CACHE": str(cwd / ".starflow-cache")}
    argv = shlex.split(command.removeprefix(".venv/bin/"))
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL)


def check_commands(commands: list[str], cwd: Path) -> None:
    for command in commands:
        res = run(command, cwd)
        assert res.returncode == 0, f"README command failed: {command}\n{res.stdout}\n{res.stderr}"
        assert "Traceback" not in res.stderr, f"{command}\n{res.stderr}"


def test_every_readme_command_is_run_or_listed_with_a_reason():
    commands = readme_commands()
    assert len(commands) > 10
    for pattern, _ in NOT_RUN:
        assert any(re.search(pattern, c) for c in commands), f"NOT_RUN entry {pattern!r} matches no README command"
    for pattern in SLOW:
        assert any(re.search(pattern, c) for c in commands), f"SLOW entry {pattern!r} matches no README command"
    for command in commands:
        assert reason_not_run(command) or command.removeprefix(".venv/bin/").startswith(("starflow ", "python",
                                                                                          "mlx.launch ")), \
            f"README command {command!r} is neither a starflow command nor listed in NOT_RUN"


def test_readme_commands_run_as_printed(tmp_path):
    check_commands([c for c in readme_commands() if not reason_not_run(c) and not is_slow(c)], tmp_path)
    assert (tmp_path / "seven.png").is_file() and (tmp_path / "same.png").is_file()


@pytest.mark.slow
def test_slow_readme_commands_run_as_printed(tmp_path):
    check_commands([c for c in readme_commands() if not reason_not_run(c) and is_slow(c)], tmp_path)


def test_readme_python_examples_run_as_printed(tmp_path):
    blocks = readme_python_blocks()
    for pattern, _ in PYTHON_NOT_RUN:
        assert any(re.search(pattern, b) for b in blocks), f"PYTHON_NOT_RUN entry {pattern!r} matches no README block"
    runnable = [b for b in blocks if not any(re.search(pattern, b) for pattern, _ in PYTHON_NOT_RUN)]
    assert runnable
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "STARFLOW_MLX_CACHE": str(tmp_path / ".starflow-cache")}
    for block in runnable:
        res = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=900, stdin=subprocess.DEVNULL)
        assert res.returncode == 0, f"README Python example failed:\n{block}\n{res.stdout}\n{res.stderr}"
    assert (tmp_path / "three.png").is_file()
