"""Check our converter, networks and sampler against tensors recorded from the official implementation.

    python -m hallo3.parity FIXTURE_DIR [--tolerance 1e-4]

FIXTURE_DIR holds `checkpoint/` (official SAT layout), `inputs.safetensors`, `forward.safetensors`, and optionally
`sampler.safetensors` + `sampler_trace.json` and `config.json` (see the fixture README). The checkpoint goes through
`hallo3.convert_sat_checkpoint`, the recorded calls are replayed, and every recorded tensor gets one line with its
max absolute error. The exit code is 1 if any error exceeds the tolerance, 2 if the fixture cannot be read.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from .convert_sat_checkpoint import CheckpointError, convert
from .scheduling_hallo3 import Hallo3DPMScheduler
from .transformer_hallo3 import Hallo3ReferenceNet, Hallo3Transformer3DModel


class Report:
    """Collects (name, max abs error) lines and prints them as they come."""

    def __init__(self, tolerance: float):
        self.tolerance = tolerance
        self.worst = 0.0
        self.failed: list[str] = []

    def compare(self, name: str, ours: torch.Tensor, recorded: torch.Tensor) -> None:
        if ours.shape != recorded.shape:
            self.failed.append(name)
            print(f"{name:<44} shape {tuple(ours.shape)} != recorded {tuple(recorded.shape)}  FAIL")
            return
        error = (ours.double() - recorded.double()).abs().max().item()
        self.worst = max(self.worst, error)
        ok = error <= self.tolerance
        if not ok:
            self.failed.append(name)
        print(f"{name:<44} max abs err {error:.3e}  {'ok' if ok else 'FAIL'}")

    def note(self, name: str, text: str) -> None:
        print(f"{name:<44} {text}")


def cfg_batch(tensor: torch.Tensor) -> torch.Tensor:
    return torch.cat([tensor, tensor])


class RecordedEngine:
    """The official engine's network call, in our terms: rows [unconditional, conditional] (architecture 7.3)."""

    def __init__(self, transformer: Hallo3Transformer3DModel, reference_net: Hallo3ReferenceNet, inputs: dict):
        self.transformer = transformer
        self.text = torch.cat([inputs["in.text_emb_uncond"], inputs["in.text_emb"]])
        self.concat = cfg_batch(inputs["in.concat_latent"])
        self.face = cfg_batch(inputs["in.face_emb"])
        self.audio = torch.cat([torch.zeros_like(inputs["in.audio_emb"]), inputs["in.audio_emb"]])
        ref_latent = inputs["in.ref_latent"]
        # reference pass: t = 0, zero text (architecture 4.2)
        self.bank = reference_net(ref_latent, torch.zeros_like(inputs["in.text_emb_uncond"]), 0.0)

    def __call__(self, x: torch.Tensor, timestep: float) -> torch.Tensor:
        """v-prediction for both rows at one timestep; x is [1, F, C, H, W]."""
        model_input = torch.cat([cfg_batch(x), self.concat], dim=2)
        timesteps = torch.full((2,), float(timestep))
        return self.transformer(
            model_input,
            self.text,
            timesteps,
            reference_hidden_states=self.bank,
            face_embeds=self.face,
            audio_embeds=self.audio,
        ).sample


def check_forward(engine: RecordedEngine, inputs: dict, recorded: dict, report: Report) -> None:
    transformer = engine.transformer
    for i, bank in enumerate(engine.bank):
        report.compare(f"fwd.ref_bank.{i}", bank, recorded[f"fwd.ref_bank.{i}"])
    if transformer.audio_proj is None or transformer.face_proj is None:
        raise CheckpointError("the fixture's denoiser lacks face or audio modules; parity needs the stage-2 network.")
    report.compare("fwd.audio_tokens", transformer.audio_proj(engine.audio), recorded["fwd.audio_tokens"])
    report.compare("fwd.face_tokens", transformer.face_proj(engine.face), recorded["fwd.face_tokens"])

    layer_out = {}

    def keep_layer_out(module, args, output):
        hidden_states, encoder_hidden_states = output
        layer_out["0"] = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # official order [text; video]

    handle = transformer.transformer_blocks[0].register_forward_hook(keep_layer_out)
    x = inputs["in.noisy_latent"]
    timestep = recorded["fwd.timestep"][0].item()
    net_out = engine(x, timestep)
    handle.remove()
    report.compare("fwd.layer_out.0", layer_out["0"], recorded["fwd.layer_out.0"])
    report.compare("fwd.net_out", net_out, recorded["fwd.net_out"])

    scheduler = Hallo3DPMScheduler()
    alpha = scheduler.train_alphas_cumprod_sqrt[int(timestep)]
    report.compare("fwd.alpha_cumprod_sqrt", alpha.reshape(1), recorded["fwd.alpha_cumprod_sqrt"])
    denoised = cfg_batch(x) * alpha.item() - net_out * (1 - alpha.item() ** 2) ** 0.5
    report.compare("fwd.denoised", denoised, recorded["fwd.denoised"])
    if "fwd.ref_out" in recorded:
        report.note("fwd.ref_out", "not checked: the engine never uses it, and our reference net stops at its bank")


def check_sampler(
    engine: RecordedEngine, recorded: dict, trace: dict, seed: int, guidance_scale: float, report: Report
) -> None:
    steps = trace["steps"]
    scheduler = Hallo3DPMScheduler()
    scheduler.set_timesteps(len(steps))
    report.compare(
        "samp.denoiser_table_alpha_cumprod_sqrt_1000",
        scheduler.train_alphas_cumprod_sqrt,
        recorded["samp.denoiser_table_alpha_cumprod_sqrt_1000"],
    )
    recorded_alphas = torch.tensor([s["alpha_cumprod_sqrt"] for s in steps] + [steps[-1]["next_alpha_cumprod_sqrt"]])
    report.compare("trace.schedule (alpha per step, then 1)", scheduler.alphas_cumprod_sqrt, recorded_alphas)
    recorded_timesteps = [s["timestep"] for s in steps]
    if scheduler.timesteps.tolist() != recorded_timesteps:
        report.failed.append("trace.timesteps")
        report.note("trace.timesteps", f"{scheduler.timesteps.tolist()} != recorded {recorded_timesteps}  FAIL")

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(recorded["samp.randn.0"].shape, generator=generator)
    report.compare("samp.randn.0", x, recorded["samp.randn.0"])
    for i, timestep in enumerate(scheduler.timesteps.tolist()):
        if i > 0:
            report.compare(f"samp.step{i}.x_in", x, recorded[f"samp.step{i}.x_in"])
        v = engine(x, timestep)
        denoised = scheduler.predict_original_sample(v, cfg_batch(x))
        report.compare(f"samp.call{i}.denoised", denoised, recorded[f"samp.call{i}.denoised"])
        # guidance on each row's x0, as the official DynamicCFG does (architecture 7.3)
        x0_uncond, x0_cond = denoised.chunk(2)
        guided = x0_uncond + guidance_scale * (x0_cond - x0_uncond)
        output = scheduler.step_denoised(guided, timestep, x, generator=generator)
        report.compare(f"samp.call{i}.guided", output.pred_original_sample, recorded[f"samp.call{i}.guided"])
        x = output.prev_sample
    report.compare("samp.final_latent", x, recorded["samp.final_latent"])

    # The draw order: the initial noise, then one draw on the first step and two on every later non-final step.
    replay = torch.Generator().manual_seed(seed)
    draws = [key for key in recorded if key.startswith("samp.randn.")]
    for j in range(len(draws)):
        report.compare(
            f"samp.randn.{j} (draw order)", torch.randn(x.shape, generator=replay), recorded[f"samp.randn.{j}"]
        )


def recorded_guidance_scale(config: dict, trace: dict) -> float:
    """The CFG scale the official sampler applied: 3.5 whatever its config says (architecture 12.1)."""
    if "cfg_scale_effective" in config.get("sampler", {}):
        return float(config["sampler"]["cfg_scale_effective"])
    implied = [
        call["scale_implied_by_output"] for call in trace.get("guider_calls", []) if "scale_implied_by_output" in call
    ]
    return round(implied[0], 4) if implied else 3.5


def run(fixture: Path, tolerance: float) -> Report:
    report = Report(tolerance)
    config_path = fixture / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    inputs = load_file(fixture / "inputs.safetensors")
    forward = load_file(fixture / "forward.safetensors")

    with tempfile.TemporaryDirectory() as workdir:
        converted = convert(
            fixture / "checkpoint", Path(workdir) / "converted", config_path if config_path.is_file() else None
        )
        transformer = Hallo3Transformer3DModel.from_pretrained(converted / "transformer").eval()
        reference_net = Hallo3ReferenceNet.from_pretrained(converted / "reference_net").eval()

    with torch.no_grad():
        engine = RecordedEngine(transformer, reference_net, inputs)
        check_forward(engine, inputs, forward, report)
        if (fixture / "sampler.safetensors").is_file() and (fixture / "sampler_trace.json").is_file():
            sampler = load_file(fixture / "sampler.safetensors")
            trace = json.loads((fixture / "sampler_trace.json").read_text())
            seed = config.get("seeds", {}).get("sampler_torch_manual_seed", 7)
            check_sampler(engine, sampler, trace, seed, recorded_guidance_scale(config, trace), report)
        else:
            report.note("samp.*", "not checked: the fixture has no sampler.safetensors/sampler_trace.json")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fixture", type=Path, help="fixture folder (checkpoint/, inputs/forward/sampler safetensors)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted max abs error")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    missing = [
        name
        for name in ("checkpoint", "inputs.safetensors", "forward.safetensors")
        if not (args.fixture / name).exists()
    ]
    if missing:
        print(f"error: {args.fixture} is not a parity fixture: missing {', '.join(missing)}.", file=sys.stderr)
        return 2
    try:
        report = run(args.fixture, args.tolerance)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    verdict = "FAIL: " + ", ".join(report.failed) if report.failed else "all within tolerance"
    print(f"worst max abs err {report.worst:.3e} (tolerance {args.tolerance:g}): {verdict}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
