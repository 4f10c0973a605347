r"""Export a training checkpoint's EMA params as an official-layout .safetensors file.

  python -m fitv2_jax.export --checkpoint WORKDIR [--step N] --output fitv2_ema.safetensors

The file loads in the official PyTorch FiT (`load_state_dict`) and in every command here that
takes --checkpoint.
"""

import argparse
import os


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fitv2_jax.export", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--checkpoint", required=True, help="training workdir or WORKDIR/checkpoints/<step>"
    )
    parser.add_argument("--step", type=int, default=None, help="step to export (default: latest)")
    parser.add_argument("--output", required=True, help="output .safetensors path")
    parser.add_argument(
        "--raw", action="store_true", help="export the raw params instead of the EMA"
    )
    args = parser.parse_args(argv)

    from fitv2_jax.training.loop import export_ema

    src = args.checkpoint
    if args.step is not None:
        src = os.path.join(args.checkpoint, "checkpoints", str(args.step))
    export_ema(src, args.output, use_ema=not args.raw)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
