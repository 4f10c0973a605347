"""Every config default, in one place: configs/*.py start from `base_config()`.

Sections: `model` (exactly the FiT constructor arguments: official names plus our compute
options, so `FiT(**config.model)` builds the network), `data` (the Grain pipeline), `train` (the
official recipe), `mesh`, and top-level fields. Fields whose default is None are typed
placeholders, so `--config.model.max_pe_len_h=32` is parsed as an int on the command line.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder


def fitv2_model(
    hidden_size: int, depth: int, num_heads: int, **overrides
) -> ml_collections.ConfigDict:
    """FiTv2 network params as in the official configs/fitv2/*.yaml (AdaLN-LoRA rank = D / 4)."""
    model = dict(
        context_size=256,
        patch_size=2,
        in_channels=4,
        hidden_size=hidden_size,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=False,
        use_sit=True,
        use_swiglu=True,
        use_swiglu_large=False,
        q_norm="layernorm",
        k_norm="layernorm",
        qk_norm_weight=False,
        rel_pos_embed="rope",
        adaln_type="lora",
        adaln_lora_dim=hidden_size // 4,
        rope_theta=10000.0,
        custom_freqs="normal",
        max_pe_len_h=placeholder(int),
        max_pe_len_w=placeholder(int),
        decouple=False,
        ori_max_pe_len=placeholder(int),
        online_rope=False,
        time_shifting=1.0,
        # compute options (ours)
        dtype="float32",
        remat_policy="none",
        attention_backend="xla",
        scan_unroll=1,  # blocks per iteration of the scan over depth (depth: no loop)
        gather_attention_once=False,  # FSDP: attention kernels gathered once, kept for backward
        clamp_time=True,
    )
    for key, value in overrides.items():
        if value is None and model.get(key) is not None:
            value = placeholder(type(model[key]))  # None, still typed for command-line overrides
        model[key] = value
    return ml_collections.ConfigDict(model)


def train_defaults() -> ml_collections.ConfigDict:
    """config.train: the official FiTv2 recipe (FITV2_FACTS.md §2) unless a config says otherwise."""
    return ml_collections.ConfigDict(
        dict(
            total_steps=2_000_000,
            learning_rate=1e-4,
            lr_base_batch_size=256,  # lr scales by global_batch / this when scale_lr
            scale_lr=False,
            warmup_steps=50_000,  # official configs (the paper says 5000)
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            grad_clip_norm=1.0,
            ema_decay=0.9999,
            grad_accum_steps=1,  # microbatches per step (global batch is split, grads summed)
            time_sampler="logit_normal",
            time_mean=0.0,
            time_std=1.0,
            # high-resolution post-training
            init_from="",  # official .safetensors/.bin or one of our workdirs/checkpoints
            init_use_ema=True,  # when init_from is one of our checkpoints
            trainable="all",  # "all" or "post_training" (x_embedder, biases, adaLN, final layer)
            reinit_trainable=False,  # re-initialise the trainable subset (official post-training)
            # checkpoints
            checkpoint_every=4000,
            keep_last=2,
            keep_steps=(),  # milestones kept forever
            async_checkpoint=True,
            # observability
            log_every=100,
            sample_every=0,  # 0 = never; else sample grids every N steps
            sample_sizes=((256, 256), (160, 320), (320, 320)),  # (height, width) in pixels
            sample_steps=32,  # Euler steps for the periodic grids
            sample_cfg_scale=1.5,
            eval_every=0,  # 0 = never; else score the EMA weights every N steps (config.eval)
            peak_flops_per_device=0.0,  # for MFU; 0 = measure a matmul peak at start-up
        )
    )


def mesh_defaults() -> ml_collections.ConfigDict:
    """config.mesh: (data, fsdp, tensor) sizes per slice (ici) and across slices (dcn); the
    slices the config's settings are for and the slices its file has presets for
    (`config.slices`; empty for the small configs)."""
    return ml_collections.ConfigDict(
        dict(ici=(1, -1, 1), dcn=(1, 1, 1), slices=(), slice_presets=())
    )


def post_training(config: ml_collections.ConfigDict, total_steps: int) -> ml_collections.ConfigDict:
    """High-resolution post-training (official configs/fitv2/config_fitv2_hr_*.yaml): 1024-token
    context, online decoupled NTK-aware RoPE from the 16-patch training grid, constant LR without
    warmup, only x_embedder / biases / adaLN / final layer train, re-initialised as the official
    code does."""
    config.model.update(
        dict(
            context_size=1024,
            custom_freqs="ntk-aware",
            decouple=True,
            ori_max_pe_len=16,
            online_rope=True,
        )
    )
    config.train.update(
        dict(
            total_steps=total_steps,
            warmup_steps=0,
            trainable="post_training",
            reinit_trainable=True,
        )
    )
    return config


def data_defaults() -> ml_collections.ConfigDict:
    """config.data: the Grain pipeline over a dataset written by `python -m fitv2_jax.prepare`."""
    return ml_collections.ConfigDict(
        dict(
            path="",  # directory written by `python -m fitv2_jax.prepare`
            split="train",
            global_batch_size=256,  # images per step over all hosts (rows when packing)
            patch_size=2,  # must match the prepared dataset
            variant="random",  # Algorithm 1: "random" (p = 1/2 when both), "resize", "crop"
            flip=True,  # random horizontal flip (both flips are stored)
            num_epochs=0,  # 0 = repeat forever
            # bucketing
            buckets=(),  # static sequence lengths; () = chosen from the data (num_buckets)
            num_buckets=8,  # compiled step shapes
            bucket_multiple=8,  # auto buckets are multiples of this
            bucket_window=0,  # batches per length-sort window; 0 = the whole epoch
            # packing
            packing=False,
            pack_length=0,  # tokens per packed row; 0 = the dataset's max_tokens
            pack_max_segments=8,
            pack_bins=0,  # rows packed at once; 0 = 4 x per-host batch
            # loading
            read_threads=2,
            prefetch=4,
            worker_count=0,  # >0: Grain multiprocess prefetch with this many processes
            worker_buffer_size=2,
        )
    )


def diffusion_defaults() -> ml_collections.ConfigDict:
    """config.diffusion: what the model learns and how it samples. FiTv2: a rectified flow (the
    flow solvers; dopri5 by default). FiT v1: improved-diffusion's DDPM with learned sigma over
    `num_train_steps`, sampled over `sampling_steps` respaced steps."""
    return ml_collections.ConfigDict(
        dict(kind="rectified_flow", num_train_steps=1000, sampling_steps=250)
    )


def eval_defaults() -> ml_collections.ConfigDict:
    """config.eval: what evaluation during training (train.eval_every) samples and scores it
    against; the same settings as the evaluate command's flags of the same names."""
    return ml_collections.ConfigDict(
        dict(
            sizes="",  # "HxW,HxW" in pixels; "" = train.sample_sizes
            num_samples=1000,  # per size
            batch_size=64,  # samples per host per batch
            rule="auto",  # RoPE rule, for all sizes or per size ("256x256=none,...")
            cfg_scale="1.5",  # for all sizes or per size
            solver="euler",
            num_steps=32,
            seed=0,  # sample i has the same noise and label at every evaluated step
            k=3,  # nearest neighbours for precision/recall
            fid_method="eigh",
            ref_npz="",  # ADM reference .npz (or per size "HxW=a.npz,...")
            ref_source="",  # or real images: demo | folder | imagenet | tfds
            ref_root="",
            ref_split="val",
            num_ref=0,  # 0 = all
        )
    )


def sampling_defaults() -> ml_collections.ConfigDict:
    """config.sampling: the official README's guidance scale for this model
    (`--cfg_scale official`)."""
    return ml_collections.ConfigDict(dict(official_cfg_scale=1.5))


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = fitv2_model(1152, 36, 16)
    config.data = data_defaults()
    config.train = train_defaults()
    config.mesh = mesh_defaults()
    config.diffusion = diffusion_defaults()
    config.sampling = sampling_defaults()
    config.eval = eval_defaults()
    config.latent = True  # tokens are SD-VAE latents (False: pixel-space tokens in [-1, 1])
    config.vae_path = ""  # SD VAE (diffusers dir or file) for latent configs: decoding samples
    return config
