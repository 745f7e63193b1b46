"""Assemble a complete Hallo3 pipeline folder from any model source, for `from_pretrained` or the Hub.

    python -m hallo3.save_pipeline --model pretrained_models --output hallo3-pipeline [--dtype bfloat16]
        [--base-model THUDM/CogVideoX-5b-I2V] [--wav2vec-model facebook/wav2vec2-base-960h] [--push-to-hub REPO]

`--model` is anything `hallo3.inference` accepts (the official layout, a converter output, a saved pipeline). The
output holds every component (T5, VAE, transformer, reference net, scheduler, wav2vec2) and loads with
`Hallo3Pipeline.from_pretrained(OUTPUT)` or `DiffusionPipeline.from_pretrained(OUTPUT, trust_remote_code=True)`.
It is written to a temporary folder beside OUTPUT and renamed when complete.
"""

import argparse
import logging
import sys
from pathlib import Path

import torch

from .convert_sat_checkpoint import CheckpointError
from .interrupts import staging_folder
from .loading import DEFAULT_BASE_MODEL, ModelSourceError, load_pipeline
from .remote_code import push_folder


logger = logging.getLogger("hallo3.save_pipeline")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def save_pipeline(
    model: str,
    output: Path,
    torch_dtype: torch.dtype = torch.bfloat16,
    base_model: str = DEFAULT_BASE_MODEL,
    wav2vec_model: str | None = None,
    push_to_hub: str | None = None,
) -> Path:
    """Load `model` and save it whole into `output` (atomic); optionally upload it to the Hub repo `push_to_hub`."""
    if output.exists():
        raise ModelSourceError(f"--output {output} already exists; choose a new folder.")
    loaded = load_pipeline(model, base_model=base_model, wav2vec_model=wav2vec_model, torch_dtype=torch_dtype)
    if loaded.is_random:
        logger.warning("Saving %s.", loaded.label)
    with staging_folder(output) as staging:
        loaded.pipeline.save_pretrained(staging)
        staging.rename(output)
    if push_to_hub:
        push_folder(output, push_to_hub)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="official pretrained_models/, converter output, or pipeline")
    parser.add_argument("--output", type=Path, required=True, help="new folder for the complete pipeline")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16", help="weights as saved")
    parser.add_argument("--base-model", default=DEFAULT_BASE_MODEL, help="T5/VAE source for converter output")
    parser.add_argument("--wav2vec-model", default=None, help="wav2vec2 source (default: the official one)")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None, help="also upload the folder to this Hub repo")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        save_pipeline(
            args.model, args.output, DTYPES[args.dtype], args.base_model, args.wav2vec_model, args.push_to_hub
        )
    except (ModelSourceError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logger.info("Wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
