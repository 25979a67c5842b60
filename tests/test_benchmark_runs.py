"""``python -m starflow_mlx.benchmarks.X`` runs: a size that cannot fit is refused in one line, the time a run
will take is said before it starts, and Ctrl-C ends it with one line and status 130."""

import pytest

from starflow_mlx.benchmarks import wan_vae
from starflow_mlx.benchmarks.entry import run


def test_ctrl_c_is_one_line_and_status_130(capsys):
    def interrupted():
        print("partial", end="")  # what was printed stays; nothing else is added but the line below
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stop:
        run(interrupted)
    assert stop.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_wan_vae_refuses_a_decode_larger_than_memory_before_building_anything(monkeypatch):
    monkeypatch.setattr("starflow_mlx.io.memory.memory_limit", lambda: 24 * 2**30)
    with pytest.raises(SystemExit) as refused:
        wan_vae.check_size(5, 480, 848, "float32", None)
    message = str(refused.value.code)
    assert message.startswith("error: decoding 480 x 848 needs about 60 GB but 24 GB is available") and "\n" not in message


def test_wan_vae_says_how_long_before_it_starts(monkeypatch, capsys):
    monkeypatch.setattr("starflow_mlx.io.memory.memory_limit", lambda: 24 * 2**30)
    wan_vae.check_size(5, 32, 64, "float32", None)  # the default size
    line = capsys.readouterr().err
    assert line.startswith("decoding 5 frames of 32 x 64 in float32: about 3 min") and "Ctrl-C" in line
    wan_vae.check_size(5, 480, 848, "float32", 16)  # tiled: it fits, and it says it takes 11 hours here
    assert "about 11.3 h" in capsys.readouterr().err
