"""Train a zoo model or a ResNet baseline: ``python train_vision.py [--config FILE] [key.sub=value ...]``.

With no arguments it trains the default config (configs/mnist5k_poolformer.yaml: a small
PoolFormer on the embedded MNIST-5k, a few minutes on 2 CPU cores). Everything else is a config
(see configs/ and zoo/train/config.py) plus dotted overrides, e.g.

    python train_vision.py --config configs/deit_small_imagenet.yaml data.dataset=/data/imagenet
    python train_vision.py train.epochs=3 optim.lr=1e-3 name=quick
    python train_vision.py --resume auto          # continue the newest checkpoint of the run

More processes, the same command (train.batch_size is the global batch, so the recipe and the
losses do not change with the number of processes; train.micro_batch_size adds accumulation):

    torchrun --nproc_per_node 8 train_vision.py --config configs/deit_small_imagenet.yaml data.dataset=/data/imagenet
    accelerate launch --multi_gpu --num_processes 8 train_vision.py --config configs/deit_small_imagenet.yaml ...
    # several machines: run on each (NODE_RANK 0..N-1); the run directory must be on shared storage
    torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node 8 --master_addr $HOST0 --master_port 29500 \
        train_vision.py --config configs/deit_small_imagenet.yaml ...
    torchrun --nproc_per_node 2 train_vision.py   # CPU: 2 processes over gloo (not `accelerate launch
                                                  # --cpu --num_processes 2`, which starts one)

Exit codes: 0 done; 2 config error (one line on stderr naming the key); 3 the run stopped itself
(too many consecutive non-finite steps, after saving its last good state).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train a zoo model or ResNet baseline with the DeiT recipe through Accelerate.",
        epilog="Overrides are key.sub=value with the value parsed as YAML (train.epochs=3, "
        "optim.betas=[0.9,0.95], model.pretrained=false).",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML config (default: configs/mnist5k_poolformer.yaml)")
    parser.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="'auto': the newest checkpoint of the run directory (fresh start if none); "
        "or a checkpoint directory. Weights and EMA load as safetensors, the "
        "optimizer/RNG state through torch.load(weights_only=True); still, resume "
        "only checkpoints you wrote",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_intermixed_args(argv)

    # Imported here so that --help answers without loading torch.
    from zoo.train import ConfigError, TrainingStopped, config_to_yaml, load_config, run

    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(config_to_yaml(cfg), end="")
            return 0
        run(cfg, resume=args.resume)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(str(e), file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
