r"""Train FiT/FiTv2: `python -m fitv2_jax.train --config configs/X.py --workdir DIR`.

  # resume is automatic: rerunning the same command continues from DIR's latest checkpoint
  python -m fitv2_jax.train --config configs/fitv2_xl.py --workdir /gcs/bucket/xl \
      --config.data.path=/data/in1k_latents_256 --config.data.global_batch_size=256
  # compile the real step ahead of time on N fake devices and report memory and collectives
  python -m fitv2_jax.train --config configs/fitv2_3b.py --dry_run --num_devices 64

WORKDIR must be a path every host sees (a gcsfuse mount of a bucket, or NFS), not a gs:// URL.
Config values are overridden with --config.a.b=value. Multi-host: launch one process per host
(launch/tpu_pod.sh, launch/gpu_slurm.sh); jax.distributed is initialised when --distributed=on, or
with auto when SLURM or a TPU pod is detected.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/fitv2_xl.py.", lock_config=False
)
flags.DEFINE_string(
    "workdir", None, "Run directory: checkpoints, metrics.jsonl, tensorboard/, samples/."
)
flags.DEFINE_bool(
    "dry_run",
    False,
    "AOT-compile one train step on --num_devices fake CPU devices and report memory.",
)
flags.DEFINE_integer("num_devices", 8, "Fake devices for --dry_run.")
flags.DEFINE_integer(
    "dry_run_batch", 0, "Global batch for --dry_run (0: config.data.global_batch_size)."
)
flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"], "Call jax.distributed.initialize()."
)


def _want_distributed(mode: str) -> bool:
    if mode != "auto":
        return mode == "on"
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def main(argv):
    del argv
    if FLAGS.config is None:
        sys.exit("--config is required, e.g. --config configs/tiny.py (see README.md).")
    if FLAGS.dry_run:
        flag = f"--xla_force_host_platform_device_count={FLAGS.num_devices}"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
        from fitv2_jax.training.dry_run import dry_run

        dry_run(FLAGS.config, FLAGS.dry_run_batch or None)
        return
    if not FLAGS.workdir:
        sys.exit("--workdir is required: the run directory for checkpoints and metrics.")
    import jax

    if _want_distributed(FLAGS.distributed):
        jax.distributed.initialize()
    from fitv2_jax.training.loop import train_and_evaluate

    result = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if result["status"] == "preempted":
        sys.exit(0)


if __name__ == "__main__":
    app.run(main)
