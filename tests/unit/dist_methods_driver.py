"""Under torchrun: train several methods one after another in the same processes (one process group, so the test
pays torchrun's start-up once).

usage: torchrun --nproc_per_node 2 -m tests.unit.dist_methods_driver CONFIG.yaml OUT_ROOT \
           [NAME=]method:mode[@OTHER.yaml] ...

Each run writes OUT_ROOT/NAME (OUT_ROOT/method-mode without a NAME), trained from CONFIG.yaml or, after an @, its
own config file.
"""

from __future__ import annotations

import sys

import torch.distributed as dist

from tuneforge.cli import quiet_libraries
from tuneforge.config import load_config
from tuneforge.train.loop import train


def main() -> int:
    config_file, out_root, runs = sys.argv[1], sys.argv[2], sys.argv[3:]
    quiet_libraries()
    dist.init_process_group("gloo")
    for run in runs:
        named, _, own_config = run.partition("@")
        name, _, spec = named.rpartition("=")
        method, mode = spec.split(":")
        cfg = load_config(own_config or config_file, [f"method={method}", f"train.distributed={mode}",
                                                      f"output_dir={out_root}/{name or f'{method}-{mode}'}"])
        train(cfg, show_progress=False)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
