"""Peak memory of the SAT -> diffusers conversion on a synthetic multi-GB checkpoint, streamed vs loaded whole.

    python benchmarks/convert_memory.py [--layers 4] [--workdir /tmp/hallo3-bench]

The synthetic checkpoint has the released model's widths (hidden 3072, 48 heads, the real audio projection with its
2.4 GB conv1, real face/audio dims) in bf16, with fewer layers. Both variants run in their own process, sampled every
20 ms from /proc: peak RSS (all resident pages), peak anonymous RSS (private memory that must fit in RAM; memory-
mapped checkpoint pages are file-backed and can be dropped by the kernel at any time).
"""

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.rss import run_sampled  # noqa: E402
from hallo3.transformer_hallo3 import get_3d_rotary_emb  # noqa: E402


HIDDEN, HEADS, HEAD_DIM, TED, TEXT, FF = 3072, 48, 64, 512, 4096, 12288
LATENT = (13, 60, 90)


def synthetic_engine(num_layers: int) -> dict[str, torch.Tensor]:
    """An official-layout state dict at the real widths; values are irrelevant for memory, so zeros are used."""

    def z(*shape):
        return torch.zeros(shape, dtype=torch.bfloat16)

    video_tokens = LATENT[0] * (LATENT[1] // 2) * (LATENT[2] // 2)
    sd = {}
    for root, hallo3 in (("model.diffusion_model.", True), ("ref_model.diffusion_model.", False)):
        sd[root + "time_embed.0.weight"], sd[root + "time_embed.0.bias"] = z(TED, HIDDEN), z(TED)
        sd[root + "time_embed.2.weight"], sd[root + "time_embed.2.bias"] = z(TED, TED), z(TED)
        sd[root + "mixins.pos_embed.pos_embedding"] = z(1, 226 + video_tokens, HIDDEN)
        cos, sin = get_3d_rotary_emb(HEAD_DIM, LATENT[0], LATENT[1] // 2, LATENT[2] // 2)
        sd[root + "mixins.pos_embed.freqs_cos"], sd[root + "mixins.pos_embed.freqs_sin"] = (
            cos.bfloat16(),
            sin.bfloat16(),
        )
        sd[root + "mixins.patch_embed.proj.weight"], sd[root + "mixins.patch_embed.proj.bias"] = (
            z(HIDDEN, 32, 2, 2),
            z(HIDDEN),
        )
        sd[root + "mixins.patch_embed.text_proj.weight"] = z(HIDDEN, TEXT)
        sd[root + "mixins.patch_embed.text_proj.bias"] = z(HIDDEN)
        sd[root + "mixins.final_layer.norm_final.weight"], sd[root + "mixins.final_layer.norm_final.bias"] = (
            z(HIDDEN),
            z(HIDDEN),
        )
        sd[root + "mixins.final_layer.linear.weight"], sd[root + "mixins.final_layer.linear.bias"] = (
            z(64, HIDDEN),
            z(64),
        )
        sd[root + "mixins.final_layer.adaLN_modulation.1.weight"] = z(2 * HIDDEN, TED)
        sd[root + "mixins.final_layer.adaLN_modulation.1.bias"] = z(2 * HIDDEN)
        sd[root + "transformer.position_embeddings.weight"] = z(64, HIDDEN)
        sd[root + "transformer.final_layernorm.weight"], sd[root + "transformer.final_layernorm.bias"] = (
            z(HIDDEN),
            z(HIDDEN),
        )
        for i in range(num_layers):
            a = f"{root}mixins.adaln_layer."
            sd[f"{a}adaLN_modulations.{i}.1.weight"], sd[f"{a}adaLN_modulations.{i}.1.bias"] = (
                z(12 * HIDDEN, TED),
                z(12 * HIDDEN),
            )
            for kind in ("query", "key"):
                sd[f"{a}{kind}_layernorm_list.{i}.weight"], sd[f"{a}{kind}_layernorm_list.{i}.bias"] = (
                    z(HEAD_DIM),
                    z(HEAD_DIM),
                )
            layer = f"{root}transformer.layers.{i}."
            shapes = {
                "input_layernorm": (HIDDEN,),
                "post_attention_layernorm": (HIDDEN,),
                "attention.query_key_value": (3 * HIDDEN, HIDDEN),
                "attention.dense": (HIDDEN, HIDDEN),
                "mlp.dense_h_to_4h": (FF, HIDDEN),
                "mlp.dense_4h_to_h": (HIDDEN, FF),
            }
            if hallo3:
                shapes.update(
                    {
                        "face_input_layernorm": (HIDDEN,),
                        "face_attn.query": (HIDDEN, HIDDEN),
                        "face_attn.key_value": (2 * HIDDEN, 1024),
                        "face_attn.dense": (HIDDEN, HIDDEN),
                        "audio_input_layernorm": (HIDDEN,),
                        "audio_attn.query": (HIDDEN, HIDDEN),
                        "audio_attn.key_value": (2 * HIDDEN, 768),
                        "audio_attn.dense": (HIDDEN, HIDDEN),
                    }
                )
            for name, shape in shapes.items():
                sd[f"{layer}{name}.weight"], sd[f"{layer}{name}.bias"] = z(*shape), z(shape[0])
        if hallo3:
            proj = f"{root}transformer."
            for name, shape in {
                "audio_proj.proj1": (512, 5 * 12 * 768),
                "audio_proj.proj2": (512, 512),
                "audio_proj.proj3": (32 * 768, 512),
                "audio_proj.norm": (768,),
                "audio_proj.conv1": (32 * 768, 32 * 768, 2),
                "face_proj.proj": (4 * 1024, 512),
                "face_proj.norm": (1024,),
            }.items():
                sd[f"{proj}{name}.weight"], sd[f"{proj}{name}.bias"] = z(*shape), z(shape[0])
    return sd


NAIVE = """
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
from hallo3.convert_sat_checkpoint import UNUSED_KEYS, convert_key, split_networks
sd = torch.load(sys.argv[1], map_location="cpu", weights_only=True)["module"]  # whole file in memory
denoiser, reference, _ = split_networks(sd)
for label, network in (("transformer", denoiser), ("reference_net", reference)):
    out = {}
    for name, tensor in network.items():
        if name not in UNUSED_KEYS:
            out.update({k: v.contiguous() for k, v in convert_key(name, tensor)})
    (Path(sys.argv[2]) / label).mkdir(parents=True)
    save_file(out, Path(sys.argv[2]) / label / "diffusion_pytorch_model.safetensors")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="layers per network (the release has 42)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hallo3-convert-bench"))
    parser.add_argument("--max-shard-size", default="1GB")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    checkpoint = args.workdir / "hallo3" / "1" / "mp_rank_00_model_states.pt"
    checkpoint.parent.mkdir(parents=True)
    (args.workdir / "hallo3" / "latest").write_text("1")
    torch.save({"module": synthetic_engine(args.layers)}, checkpoint)
    size_mib = checkpoint.stat().st_size / 2**20
    repo = str(Path(__file__).resolve().parent.parent)
    env_python = [sys.executable]
    os.environ["PYTHONPATH"] = repo + os.pathsep + os.environ.get("PYTHONPATH", "")

    streamed = run_sampled(
        env_python
        + [
            "-m",
            "hallo3.convert_sat_checkpoint",
            "--checkpoint",
            str(args.workdir / "hallo3"),
            "--output",
            str(args.workdir / "streamed"),
            "--max-shard-size",
            args.max_shard_size,
        ]
    )
    naive = run_sampled(env_python + ["-c", NAIVE, str(checkpoint), str(args.workdir / "naive")])

    print(f"synthetic checkpoint: {size_mib:,.0f} MiB ({args.layers} layers per network, real widths, bf16)")
    print(f"{'variant':<34}{'time s':>8}{'peak RSS MiB':>14}{'peak anon MiB':>15}{'anon / ckpt':>13}")
    for label, r in (("streamed (ours, mmap + shards)", streamed), ("loaded whole (torch.load, 1 file)", naive)):
        print(
            f"{label:<34}{r['seconds']:>8.1f}{r['rss_mib']:>14,.0f}{r['anon_mib']:>15,.0f}{r['anon_mib'] / size_mib:>13.2f}"
        )
    print(
        f"ratio streamed/whole: peak anon {streamed['anon_mib'] / naive['anon_mib']:.2f}, "
        f"time {streamed['seconds'] / naive['seconds']:.2f}"
    )
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
