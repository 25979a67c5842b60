"""``starflow launch``: the ranks of one job started as ``mlx.launch`` starts them, with an exit status that says
whether they all succeeded (see :mod:`starflow_mlx.io.launcher`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def launch(
    ctx: typer.Context,
    ranks: Optional[int] = typer.Option(None, "-n", "--ranks", help="Start this many ranks on this machine."),
    hostfile: Optional[Path] = typer.Option(None, "--hostfile", help="mlx.launch's hostfile: one rank per host, "
                                                                     "started over ssh (ring backend)."),
    starting_port: Optional[int] = typer.Option(None, "--starting-port", help="Rank r listens on this port + r "
                                                                              "(default: free ports here, 32323 "
                                                                              "with a hostfile)."),
) -> None:
    """Run COMMAND (after --) as the ranks of one job: `starflow launch -n 2 -- starflow generate ...`.

    Exits 1 with the failing rank's error line when a rank fails; the other ranks are given 30 s to stop
    by themselves, then killed (a rank stopped with SIGSTOP too).
    """
    from starflow_mlx.io.launcher import LaunchError, launch as run, local_hosts, read_hostfile

    if (ranks is None) == (hostfile is None):
        raise LaunchError("give either -n N (ranks on this machine) or --hostfile FILE (one rank per host)")
    if starting_port is not None and not 0 < starting_port < 65536:
        raise LaunchError(f"--starting-port must be a port number (1 to 65535), got {starting_port}")
    hosts = local_hosts(ranks) if hostfile is None else read_hostfile(hostfile)
    status = run(list(ctx.args), hosts, starting_port)
    if status:
        raise typer.Exit(status)
