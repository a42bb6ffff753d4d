"""Imported once by ftrun's fork server (``--warm-start``): torch, and signal dispositions.

Every worker, and every restarted worker, is forked from that server, so a restart skips the
import of torch, and of what a worker imports lazily before its first step: DDP's constructor
imports ``torch._dynamo`` (with torch.onnx and parts of inductor), 2 s of a 2.3 s start-up on
the loaded 2-core test machine; DCP's state-dict helpers, yaml and filelock follow.

The server must outlive the preemption signals: SLURM (and ``kill -- -PGID``)
sends them to every process of a job step, and a fork server killed by one takes the workers'
launch channel with it. So the server ignores them; each worker installs its own handler
(``launcher.preempt``) as soon as ``launcher/run.py`` starts, replacing the inherited ignore.
"""

import signal

from launcher import env

for _name in env.detect().preempt_signals:
    signal.signal(getattr(signal, _name), signal.SIG_IGN)

import filelock  # noqa: E402,F401
import numpy  # noqa: E402,F401
import torch  # noqa: E402
import torch._dynamo  # noqa: E402
import torch.distributed  # noqa: E402
import torch.distributed.checkpoint  # noqa: E402
import torch.distributed.checkpoint.state_dict  # noqa: E402
import torch.nn.parallel  # noqa: E402,F401
import yaml  # noqa: E402,F401
