"""Imported once by ftrun's fork server (``--warm-start``): torch, and signal dispositions.

Every worker, and every restarted worker, is forked from that server, so a restart skips the
import of torch. The server must outlive the preemption signals: SLURM (and ``kill -- -PGID``)
sends them to every process of a job step, and a fork server killed by one takes the workers'
launch channel with it. So the server ignores them; each worker installs its own handler
(``launcher.preempt``) as soon as ``launcher/run.py`` starts, replacing the inherited ignore.
"""

import signal

from launcher import env

for _name in env.detect().preempt_signals:
    signal.signal(getattr(signal, _name), signal.SIG_IGN)

import numpy  # noqa: E402,F401
import torch  # noqa: E402
import torch.distributed  # noqa: E402
import torch.distributed.checkpoint  # noqa: E402,F401
