"""Peak memory of a whole CLI run against audio length: flat, because frames stream to the encoder.

    python benchmarks/audio_length_memory.py [--seconds 5 20 60] [--model tiny-random] [--steps 1]

Each length runs `python -m hallo3.inference` in its own process on the example portrait with synthetic speech of
that length; peak RSS and peak anonymous RSS are sampled from /proc every 20 ms.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.rss import run_sampled  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, nargs="+", default=[5, 20, 60])
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--steps", type=int, default=1)
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for seconds in args.seconds:
            t = np.arange(int(16000 * seconds)) / 16000
            audio = Path(workdir) / f"speech_{seconds:g}s.wav"
            soundfile.write(
                audio, (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32), 16000
            )
            result = run_sampled(
                [
                    sys.executable,
                    "-m",
                    "hallo3.inference",
                    "--model",
                    args.model,
                    "--image",
                    str(REPO / "assets" / "examples" / "0001.jpg"),
                    "--audio",
                    str(audio),
                    "--output",
                    str(Path(workdir) / "out.mp4"),
                    "--steps",
                    str(args.steps),
                    "--seed",
                    "0",
                    "--max-audio-seconds",
                    str(max(args.seconds) + 1),
                ]
            )
            rows.append((seconds, -(-int(np.ceil(seconds * 25)) // 47), result))
    first = rows[0][2]
    print(f"model {args.model}, {args.steps} step(s) per clip\n")
    print(
        "| audio s | clips | time s | peak RSS MiB | peak anon MiB | anon ratio to first |\n|---|---|---|---|---|---|"
    )
    for seconds, clips, r in rows:
        print(
            f"| {seconds:g} | {clips} | {r['seconds']:.1f} | {r['rss_mib']:,.0f} | {r['anon_mib']:,.0f} | "
            f"{r['anon_mib'] / first['anon_mib']:.2f} |"
        )


if __name__ == "__main__":
    main()
