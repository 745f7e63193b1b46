"""How a saved Hallo3 pipeline folder (or a Hub repo made from one) names its code, for both ways of loading it.

diffusers loads pipelines and components that live outside the library from Python files inside the repository,
named in `model_index.json` as `[file stem, class name]`: the pipeline's file at the root, each custom component's
file in its own folder (diffusers' "custom pipelines and components" convention). `save_hallo3_folder` writes those
entries and files, so that

    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

works. The files are shims that import the installed `hallo3` package (diffusers names the missing package when it is
not installed), so the code that runs is the released package, not a copy that could drift from it.

`Hallo3Pipeline.from_pretrained(folder)` needs no remote code: it maps the same entries back to this package's
modules (`resolve_for_installed_package`) before diffusers reads them, so nothing in the folder is executed.
"""

import json
from pathlib import Path


MODEL_INDEX = "model_index.json"
# file stem written into the folder -> the installed module it stands for
SHIM_MODULES = {
    "pipeline_hallo3": "hallo3.pipeline_hallo3",
    "transformer_hallo3": "hallo3.transformer_hallo3",
    "scheduling_hallo3": "hallo3.scheduling_hallo3",
}
# component -> (file stem, class name); the pipeline class sits at the root under `_class_name`
CUSTOM_COMPONENTS = {
    "transformer": ("transformer_hallo3", "Hallo3Transformer3DModel"),
    "reference_net": ("transformer_hallo3", "Hallo3ReferenceNet"),
    "scheduler": ("scheduling_hallo3", "Hallo3DPMScheduler"),
}
PIPELINE_ENTRY = ("pipeline_hallo3", "Hallo3Pipeline")

SHIM_TEMPLATE = '''"""diffusers remote-code entry for a Hallo3 folder: `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`
imports {name} from here. The code is the installed `hallo3` package (`pip install .` from its repository)."""

from {module} import {name}  # noqa: F401
'''


def write_remote_code(folder: str | Path) -> None:
    """Point `folder`'s model_index.json at shim files and write them (after `DiffusionPipeline.save_pretrained`)."""
    folder = Path(folder)
    index_path = folder / MODEL_INDEX
    index = json.loads(index_path.read_text())
    index["_class_name"] = list(PIPELINE_ENTRY)
    _write_shim(folder / f"{PIPELINE_ENTRY[0]}.py", *PIPELINE_ENTRY)
    for component, (stem, class_name) in CUSTOM_COMPONENTS.items():
        if index.get(component, [None])[0] is None:  # an optional component saved as absent
            continue
        index[component] = [stem, class_name]
        _write_shim(folder / component / f"{stem}.py", stem, class_name)
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_shim(path: Path, stem: str, class_name: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(SHIM_TEMPLATE.format(module=SHIM_MODULES[stem], name=class_name))


def resolve_for_installed_package(index: dict) -> dict:
    """model_index.json as `Hallo3Pipeline.from_pretrained` should read it: shim entries become this package's
    modules (already imported, so diffusers takes the classes from them and runs no file of the folder)."""
    index = dict(index)
    if isinstance(index.get("_class_name"), list) and tuple(index["_class_name"]) == PIPELINE_ENTRY:
        index["_class_name"] = PIPELINE_ENTRY[1]
    for component, entry in index.items():
        if isinstance(entry, list) and len(entry) == 2 and entry[0] in SHIM_MODULES:
            index[component] = [SHIM_MODULES[entry[0]], entry[1]]
    return index


def push_folder(
    folder: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
) -> str:
    """Upload a saved pipeline folder to the Hub repo `repo_id` (created if needed); returns the repo id."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        token=token,
        commit_message=commit_message or "Upload Hallo3Pipeline",
        create_pr=create_pr,
    )
    return repo_id
