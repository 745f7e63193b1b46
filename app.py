"""Gradio app for Hallo3: a Generate tab and an Ablation tab over `hallo3.inference`.

    python app.py [--model M] [--host H] [--port P] [--share]

Without --host/--port, gradio's GRADIO_SERVER_NAME / GRADIO_SERVER_PORT apply (as on a Hugging Face Space).

Without real weights it starts on the tiny-random model with a banner that says so. The widgets live here; the
library (`hallo3`) has no gradio import. Named API endpoints: /generate and /ablation (see the README).
"""

import argparse
import contextlib
import gc
import io
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import gradio as gr
import torch

from hallo3.inference import INPUT_ERRORS, GenerationResult, GenerationSettings, PortraitAnimator, setup_console
from hallo3.interrupts import Interrupted, stop_on_signals
from hallo3.loading import TINY_RANDOM, load_pipeline
from hallo3.memory import available_memory_modes
from hallo3.resumable import fingerprint
from hallo3.settings import DEFAULTS, MAX_MOTION_FRAMES, SettingError


try:  # ZeroGPU on a Hugging Face Space; a no-op elsewhere
    import spaces

    GPU = spaces.GPU
except ImportError:

    def GPU(fn=None, **kwargs):
        return fn if fn is not None else (lambda f: f)


logger = logging.getLogger("hallo3.app")

ASSETS = Path(__file__).parent / "assets"
EXAMPLES = [
    [
        str(ASSETS / "examples" / "0001.jpg"),
        str(ASSETS / "examples" / "0001.mp3"),
        "A little girl talking around a campfire",
    ],
    [
        str(ASSETS / "examples" / "0008.jpg"),
        str(ASSETS / "examples" / "0008.wav"),
        "An older man with messy hair is on vacation at the beach, posting selfie videos",
    ],
]
MAX_VARIANTS = 4
EXAMPLE_SEED = 42
OUTPUT_TTL_SECONDS = 3600
# axis label -> (GenerationSettings field, how to read one value, default values)
ABLATION_AXES: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "CFG scale": ("guidance_scale", float, "2.0, 3.5, 5.0"),
    "audio guidance scale": ("audio_guidance_scale", float, "1.0, 3.5, 6.0"),
    "motion frames": ("motion_frames", int, "1, 2, 3"),
    "identity reference": ("disable_reference", lambda v: v.strip().lower() == "off", "on, off"),
    "face embedding": ("disable_face_embedding", lambda v: v.strip().lower() == "off", "on, off"),
    "audio conditioning": ("disable_audio", lambda v: v.strip().lower() == "off", "on, off"),
    "steps": ("num_inference_steps", int, "10, 25, 50"),
    "seed": ("seed", int, "0, 1, 2"),
}
# setting -> how the page names it (the ablation axes; the sliders cannot leave their rules' ranges)
SETTING_LABELS = {field: label for label, (field, _, _) in ABLATION_AXES.items()}
RANDOM_BANNER = (
    "⚠️ **Demo mode: tiny random model.** The videos below come from random weights and look like noise; they only "
    "show that the whole path works. To run the real Hallo3: download the official weights "
    "(`hf download fudan-generative-ai/hallo3 --local-dir pretrained_models`) and start "
    "`python app.py --model pretrained_models`, or pass a converted folder (see the README)."
)


def slider_settings(prompt, guidance_scale, audio_guidance_scale, motion_frames, steps, seed) -> GenerationSettings:
    """Widget values (gradio sends floats for sliders and numbers) as generation settings."""
    return GenerationSettings(
        prompt=prompt or "",
        num_inference_steps=int(steps),
        guidance_scale=float(guidance_scale),
        audio_guidance_scale=float(audio_guidance_scale),
        motion_frames=int(motion_frames),
        seed=None if seed is None else int(seed),
    )


def refusal(message: str) -> gr.Error:
    """A request the app turns down: one line in the server's log, the message on the page. The mistake is the
    user's, so gradio prints no traceback of it."""
    logger.info("refused a request: %s", message)
    return gr.Error(message, print_exception=False)


def uploaded(value: str | dict | None, kind: str) -> tuple[str, str]:
    """(server path, the name the user gave the file) of an upload. The buttons run with gradio's preprocessing off,
    so that an unreadable upload reaches our checks (which name it and say the rule) instead of failing in gradio
    with its internal error and server paths; examples and API calls may still pass a plain path."""
    if isinstance(value, str) and value:
        return value, Path(value).name
    if isinstance(value, dict) and value.get("path"):
        return value["path"], Path(value.get("orig_name") or value["path"]).name
    raise refusal(
        f"Upload the {kind} first."
        if value in (None, "")
        else f"The {kind} upload arrived incomplete; upload it again."
    )


class Hallo3App:
    """The model shared by every request, and the functions behind the buttons.

    Args:
        animator (`PortraitAnimator`): the loaded model; one per process, protected by the queue's concurrency 1.
        model_source (`str`): what `animator` was loaded from (`--model`); quantized memory modes reload from it.
        device (`str`): where the pipeline runs.
        output_dir (`Path`): where videos are written; files older than an hour are removed.
        max_audio_seconds (`float`): uploads longer than this are refused.
        memory_mode (`str`): the mode `animator` was built with.
    """

    def __init__(
        self,
        animator: PortraitAnimator,
        model_source: str,
        device: str,
        output_dir: Path,
        max_audio_seconds: float = 120.0,
        memory_mode: str = "none",
    ):
        self.animator = animator
        self.model_source = model_source
        self.device = device
        self.output_dir = output_dir
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.max_audio_seconds = max_audio_seconds
        self.memory_mode = memory_mode
        self.lock = threading.Lock()

    def clean_old_outputs(self) -> None:
        cutoff = time.time() - OUTPUT_TTL_SECONDS
        for path in self.output_dir.glob("*.mp4"):
            if path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
        for run in self.output_dir.glob(".*.mp4.run"):  # a failed job nobody asked for again
            if run.stat().st_mtime < cutoff:
                shutil.rmtree(run, ignore_errors=True)

    def set_memory_mode(self, mode: str) -> None:
        """Rebuild the model in `mode`. Offload hooks and quantized weights cannot be undone in place, so any change
        reloads from `model_source`; the old model is released first so that two never share the GPU."""
        if not mode or mode == self.memory_mode:
            return
        if mode not in available_memory_modes():
            raise refusal(f"Memory mode {mode} is not available on this machine.")
        torch_dtype = self.animator.pipeline.dtype
        with self.lock:
            logger.info(
                "Switching the memory mode from %s to %s: reloading %s.", self.memory_mode, mode, self.model_source
            )
            del self.animator
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            model = load_pipeline(self.model_source, torch_dtype=torch_dtype, memory_mode=mode)
            self.animator = PortraitAnimator(model, self.device, mode)
            self.memory_mode = mode

    def run(
        self, image: str | dict | None, audio: str | dict | None, settings: GenerationSettings
    ) -> GenerationResult:
        """One video; user errors become gr.Error so the page shows them and the app keeps serving.

        Errors name the files as the user uploaded them, never the server's paths, and they are logged as one line
        (`refusal`): they are the user's, not the app's. An internal error is logged with its traceback, once.
        """
        image_path, image_name = uploaded(image, "portrait image")
        audio_path, audio_name = uploaded(audio, "speech audio")
        settings = replace(settings, max_audio_seconds=self.max_audio_seconds)  # the caller's value stays as it was
        self.clean_old_outputs()
        output = self.output_for(image_path, audio_path, settings)
        try:
            with self.lock:
                return self.animator.generate(
                    image_path,
                    audio_path,
                    output,
                    settings,
                    overwrite=True,
                    names=(image_name, audio_name),
                    resume=True,
                )
        except SettingError as error:  # named as the page names it
            raise refusal(error.naming(SETTING_LABELS.get(error.name, error.name))) from None
        except (*INPUT_ERRORS, ValueError) as error:
            raise refusal(str(error)) from None
        except Exception as error:  # keep serving; the log has the traceback
            logger.exception("generation failed")
            raise gr.Error(
                f"Internal error ({type(error).__name__}). The server log has the details.", print_exception=False
            ) from None

    def output_for(self, image: str, audio: str, settings: GenerationSettings) -> Path:
        """Where a job's video goes. With a fixed seed the name comes from the inputs and settings, so a job that
        failed part way (an OOM, a restart of the model) continues from its finished clips when it is asked again;
        with a random seed every job is new."""
        if settings.seed is None:
            output = Path(tempfile.mkstemp(prefix="hallo3-", suffix=".mp4", dir=self.output_dir)[1])
            output.unlink()  # the writer creates it atomically
            return output
        job = fingerprint(Path(image), Path(audio), asdict(settings), self.animator.setup)
        return self.output_dir / f"hallo3-{job[:24]}.mp4"

    def generate(
        self,
        image: str | None,
        audio: str | None,
        prompt: str,
        guidance_scale: float,
        audio_guidance_scale: float,
        motion_frames: int,
        steps: int,
        seed: int,
        randomize_seed: bool,
        memory_mode: str,
        progress=gr.Progress(track_tqdm=True),
    ) -> tuple[str, str]:
        self.set_memory_mode(memory_mode)
        settings = slider_settings(
            prompt, guidance_scale, audio_guidance_scale, motion_frames, steps, None if randomize_seed else seed
        )
        result = self.run(image, audio, settings)
        summary = (
            f"**Model:** {self.animator.model.label}  \n**Video:** {result.video_seconds:.2f} s "
            f"({result.num_frames} frames) in {result.seconds:.1f} s  \n**Settings:** steps "
            f"{settings.num_inference_steps}, CFG {settings.guidance_scale}, audio guidance "
            f"{settings.audio_guidance_scale}, motion frames {settings.motion_frames}, seed {result.seed}, memory "
            f"{self.memory_mode}  \n**Inputs:** "
            + "; ".join(f"{name}: {note}" for name, note in result.inputs.items())
        )
        return str(result.path), summary

    def generate_example(self, image: str, audio: str, prompt: str, progress=gr.Progress(track_tqdm=True)):
        """An example with the default settings (cached after its first run); a few steps on random weights."""
        return self.generate(
            image,
            audio,
            prompt,
            DEFAULTS.guidance_scale,
            DEFAULTS.guidance_scale,  # equal: the official joint guidance
            DEFAULTS.motion_frames,
            DEFAULTS.num_inference_steps if not self.animator.model.is_random else 4,
            EXAMPLE_SEED,
            False,
            self.memory_mode,
        )

    def ablation(
        self,
        image: str | None,
        audio: str | None,
        prompt: str,
        axis: str,
        values: str,
        guidance_scale: float,
        audio_guidance_scale: float,
        motion_frames: int,
        steps: int,
        seed: int,
        progress=gr.Progress(track_tqdm=True),
    ) -> tuple:
        """2-4 variants along one axis, same inputs and seed; returns MAX_VARIANTS video slots and a summary."""
        if axis not in ABLATION_AXES:
            raise refusal(f"Pick an axis: {', '.join(ABLATION_AXES)}.")
        field_name, parse, _ = ABLATION_AXES[axis]
        texts = [v.strip() for v in (values or "").split(",") if v.strip()]
        if not 2 <= len(texts) <= MAX_VARIANTS:
            raise refusal(f"Give 2 to {MAX_VARIANTS} comma-separated values for {axis}; got {len(texts)}.")
        try:
            parsed = [parse(text) for text in texts]
        except ValueError:
            raise refusal(f"Values for {axis} must look like: {ABLATION_AXES[axis][2]}.") from None

        slots: list[dict] = []
        lines: list[str] = []
        for text, value in zip(texts, parsed):
            settings = slider_settings(prompt, guidance_scale, audio_guidance_scale, motion_frames, steps, seed)
            setattr(settings, field_name, value)
            progress((len(slots), len(parsed)), desc=f"{axis} = {text} ({len(slots) + 1} of {len(parsed)})")
            result = self.run(image, audio, settings)
            label = f"{axis} = {text} · {result.seconds:.1f} s"
            slots.append(gr.update(value=str(result.path), label=label, visible=True))
            lines.append(f"| {text} | {result.seconds:.1f} s |")
        slots += [gr.update(value=None, visible=False)] * (MAX_VARIANTS - len(slots))
        summary = f"**{axis}**, seed {int(seed)}, {int(steps)} steps\n\n| value | time |\n|---|---|\n" + "\n".join(
            lines
        )
        return (*slots, summary)


def build_demo(app: Hallo3App, is_random: bool, memory_modes: list[str]) -> gr.Blocks:
    """The page; `app` supplies the event functions. Nothing here loads weights."""
    # gradio's own upload/result cache is swept hourly: files older than an hour go
    with gr.Blocks(title="Hallo3 talking portraits", delete_cache=(OUTPUT_TTL_SECONDS, OUTPUT_TTL_SECONDS)) as demo:
        gr.Markdown("# Hallo3: talking portraits from one photo and a speech recording")
        if is_random:
            gr.Markdown(RANDOM_BANNER, elem_id="random-banner")
        with gr.Row():
            with gr.Column():
                # no mode conversion: `load_image` reads 16-bit, CMYK and EXIF-rotated photos that gradio would clip
                image = gr.Image(
                    label="Portrait", type="filepath", image_mode=None, sources=["upload", "webcam"], elem_id="image"
                )
                audio = gr.Audio(
                    label="Speech", type="filepath", format=None, sources=["upload", "microphone"], elem_id="audio"
                )
                # every input but the two files has a value: API callers may leave them out (see test_app)
                prompt = gr.Textbox(
                    value=DEFAULTS.prompt,
                    label="Prompt (optional)",
                    placeholder="A woman talking on a beach at sunset",
                )
            with gr.Column():
                guidance = gr.Slider(
                    1.0, 10.0, value=DEFAULTS.guidance_scale, step=0.5, label="Guidance (CFG) scale", elem_id="cfg"
                )
                audio_guidance = gr.Slider(
                    0.0,
                    10.0,
                    value=DEFAULTS.guidance_scale,
                    step=0.5,
                    label="Audio guidance scale",
                    info="equal to CFG: the official joint guidance, no extra pass",
                )
                motion_frames = gr.Slider(
                    0,
                    MAX_MOTION_FRAMES,
                    value=DEFAULTS.motion_frames,
                    step=1,
                    label="Motion frames",
                    info="2 as trained",
                )
                steps = gr.Slider(1, 100, value=DEFAULTS.num_inference_steps, step=1, label="Steps", elem_id="steps")
                with gr.Row():
                    seed = gr.Number(value=EXAMPLE_SEED, precision=0, label="Seed", minimum=0)
                    randomize = gr.Checkbox(value=False, label="Random seed")
                memory_mode = gr.Dropdown(
                    memory_modes, value=memory_modes[0], label="Memory mode", info="the modes this machine supports"
                )

        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                video = gr.Video(label="Result", elem_id="result-video")
                summary = gr.Markdown(elem_id="result-summary")
                with contextlib.redirect_stdout(io.StringIO()) as printed:  # gradio prints where it caches them
                    gr.Examples(
                        examples=EXAMPLES,
                        inputs=[image, audio, prompt],
                        outputs=[video, summary],
                        label="Examples",
                        fn=GPU(app.generate_example, duration=300),
                        cache_examples=True,
                        cache_mode="lazy",
                    )
                for line in printed.getvalue().splitlines():
                    if line.strip():
                        logging.getLogger("gradio").info(line)  # gradio's line, as a gradio record
            with gr.Tab("Ablation", id="ablation"):
                gr.Markdown(
                    "Run 2-4 variants along one axis over the same inputs and seed; the other settings come "
                    "from the controls above."
                )
                with gr.Row():
                    axis = gr.Dropdown(list(ABLATION_AXES), value="CFG scale", label="Axis", elem_id="axis")
                    values = gr.Textbox(
                        value=ABLATION_AXES["CFG scale"][2], label="Values (comma-separated)", elem_id="values"
                    )
                ablation_button = gr.Button("Run ablation", variant="primary", elem_id="ablation-btn")
                with gr.Row():
                    variant_videos = [gr.Video(visible=False, elem_id=f"variant-{i}") for i in range(MAX_VARIANTS)]
                ablation_summary = gr.Markdown(elem_id="ablation-summary")

        axis.change(lambda name: ABLATION_AXES[name][2], inputs=axis, outputs=values, api_visibility="private")
        generate_button.click(
            GPU(app.generate, duration=300),
            inputs=[
                image,
                audio,
                prompt,
                guidance,
                audio_guidance,
                motion_frames,
                steps,
                seed,
                randomize,
                memory_mode,
            ],
            outputs=[video, summary],
            api_name="generate",
            preprocess=False,  # see `uploaded`
        )
        ablation_button.click(
            GPU(app.ablation, duration=900),
            inputs=[image, audio, prompt, axis, values, guidance, audio_guidance, motion_frames, steps, seed],
            outputs=[*variant_videos, ablation_summary],
            api_name="ablation",
            preprocess=False,  # see `uploaded`
        )
    return demo


def default_model() -> str:
    """Real weights when they are where the official instructions put them; tiny-random otherwise."""
    if os.environ.get("HALLO3_MODEL"):
        return os.environ["HALLO3_MODEL"]
    local = Path("pretrained_models")
    return (
        str(local)
        if (local / "hallo3" / "latest").is_file() or (local / "model_index.json").is_file()
        else TINY_RANDOM
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Hallo3 Gradio app")
    parser.add_argument("--model", default=None, help="model source (default: pretrained_models/ or tiny-random)")
    # unset: gradio's GRADIO_SERVER_NAME / GRADIO_SERVER_PORT apply (a Space sets them), else 127.0.0.1:7860
    parser.add_argument(
        "--host", default=None, help="address to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--share", action="store_true", help="public gradio.live link")
    parser.add_argument("--max-audio-seconds", type=float, default=120.0, help="longer uploads are refused")
    parser.add_argument(
        "--verbose", action="store_true", help="show the libraries' log lines, warnings and progress bars too"
    )
    args = parser.parse_args(argv)
    setup_console(args.verbose)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    source = args.model or default_model()
    model = load_pipeline(source, torch_dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    # one folder per app process: two apps on one machine never sweep each other's videos
    output_dir = Path(tempfile.mkdtemp(prefix="hallo3-app-"))
    app = Hallo3App(PortraitAnimator(model, device), source, device, output_dir, args.max_audio_seconds)
    demo = build_demo(app, model.is_random, available_memory_modes())
    demo.queue(default_concurrency_limit=1, max_size=16)
    logger.info("Videos go to %s (removed when the app stops).", output_dir)
    try:
        with stop_on_signals():  # SIGTERM (docker stop, a Space restart) and SIGHUP end the app like Ctrl-C
            # gradio's own wait would take the signal's exception for a Ctrl-C of its own and print about it
            _, local_url, share_url = demo.launch(
                server_name=args.host,
                server_port=args.port,
                share=args.share,
                max_file_size="50mb",
                show_error=True,
                allowed_paths=[str(ASSETS)],
                prevent_thread_lock=True,
                quiet=True,
            )
            logger.info("Running on %s", local_url)
            if share_url:
                logger.info("Public link: %s", share_url)
            while demo.is_running:
                time.sleep(0.5)
    except Interrupted as interrupted:
        logger.info("Stopped by %s.", interrupted.signal_name)
    finally:
        demo.close(verbose=False)
        shutil.rmtree(output_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
