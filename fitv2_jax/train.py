r"""Train FiT/FiTv2: `python -m fitv2_jax.train --config configs/X.py --workdir DIR`.

  # resume is automatic: rerunning the same command continues from DIR's latest checkpoint
  python -m fitv2_jax.train --config configs/fitv2_xl.py --workdir gs://bucket/xl \
      --config.data.path=/data/in1k_latents_256 --config.data.global_batch_size=256
  # compile the real step for a TPU pod with the TPU compiler (needs the [tpu] extra):
  # per-chip memory, collectives, the compiler's step-time estimate and MFU
  python -m fitv2_jax.train --config configs/fitv2_xl.py --dry_run --topology v5p-64
  # the same on N fake CPU devices (CPU compiler, no estimate)
  python -m fitv2_jax.train --config configs/fitv2_3b.py --dry_run --num_devices 64

WORKDIR is a URL every host reaches (gs://bucket/run: checkpoints, config.json, metrics.jsonl,
TensorBoard, sample grids and evaluations all go there; `pip install 'fitv2_jax[gcs]'`) or a
path every host sees (NFS, a gcsfuse mount).
Config values are overridden with --config.a.b=value. Multi-host: launch one process per host
(launch/tpu_pod.sh, launch/gpu_slurm.sh); jax.distributed is initialised with --distributed=on,
or with auto when SLURM or a TPU pod is detected.
"""

import jax
from absl import flags
from ml_collections import config_flags

from fitv2_jax.cli.app import run
from fitv2_jax.cli.distributed import define_distributed_flags, start_distributed
from fitv2_jax.training.dry_run import dry_run
from fitv2_jax.training.loop import train
from fitv2_jax.utils.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/fitv2_xl.py",
                                lock_config=False)  # fmt: skip
flags.DEFINE_string("workdir", None, "run directory or URL (gs://...): checkpoints, "
                    "metrics.jsonl, tensorboard/, samples/")  # fmt: skip
flags.DEFINE_bool("dry_run", False, "AOT-compile one train step for --topology (TPU compiler) "
                  "or on --num_devices fake CPU devices, and report memory")  # fmt: skip
flags.DEFINE_string("topology", None, "--dry_run for a TPU slice: v5p-64, v5e-256, v6e-64, "
                    "v4-32 or kind:grid (v5p:4x4x2); multi-slice per config.mesh.dcn")  # fmt: skip
flags.DEFINE_bool("estimate", True, "--dry_run --topology: also compile the two programs of the "
                  "compiler's step-time estimate")  # fmt: skip
flags.DEFINE_integer("num_devices", 8, "fake CPU devices for --dry_run without --topology")
flags.DEFINE_integer("dry_run_batch", None, "global batch for --dry_run (default: "
                     "config.data.global_batch_size)")  # fmt: skip
define_distributed_flags(__name__)
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; flags look like --workdir DIR")
    if FLAGS.dry_run:
        jax.config.update("jax_platforms", "cpu")  # before any device is touched
        jax.config.update("jax_num_cpu_devices", FLAGS.num_devices)
        dry_run(FLAGS.config, FLAGS.dry_run_batch, FLAGS.topology, FLAGS.estimate)
        return
    if not FLAGS.workdir:
        raise UserError("--workdir is required: the run directory for checkpoints and metrics")
    start_distributed()
    result = train(FLAGS.config, FLAGS.workdir)
    if result["status"] == "preempted":
        print("preempted: rerun the same command to resume")


if __name__ == "__main__":
    run(main)
