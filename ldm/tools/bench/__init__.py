"""`make bench`: the project's steps against reference implementations, with FLOPs and MFU.

    python -m ldm.tools.bench [--quick] [--steps 5] [--batch-size N] [--precision fp32 bf16] [--only GROUP ...]
                        [--json outputs/bench.json] [--compare OLD.json [NEW.json]]

Groups: `denoisers` (DiT against diffusers' DiTTransformer2DModel, the SD 1.x UNet layout against
UNet2DConditionModel: train steps), `autoencoders` (the SD VAE against AutoencoderKL), `sampling`
(images/s per sampler at the same NFE, guidance's batched call against two calls) and `data` (the
offline cache against encoding every step). The members of a comparison alternate step by step in
one process, so their ratio holds under any machine load; absolute times do not.
"""
