"""Checkpoints that ship their own code (MERT-v2): an opt-in, pinned path, never on by default.

The five v0/v1 models never come here: their weights are exactly transformers' HubertModel / Data2VecAudioModel
and are built natively (pipeline.models). A checkpoint whose config.json names a model type transformers does
not know and maps it to its own code (`auto_map`) is loaded here, and only when

- the run asked for it (`--trust-remote-code`, YAML `trust_remote_code: true`): the code runs with the job's
  credentials and token in reach;
- the checkpoint is pinned, so the code is fixed: a hub id with `@<40-hex commit>`, or a local or object-storage
  snapshot;
- every `auto_map` entry points into the checkpoint itself (an `other/repo--module.Class` entry is refused);
- the code files' hash (part of the content hash, recorded in provenance) equals the one the driver checked,
  on every node, before anything is imported.

The model's own processor prepares the input (`processor(waveforms, sampling_rate=..., return_tensors="pt")`) and
`model(**inputs, output_hidden_states=True)` returns `hidden_states` (index 0 = block 1: no input-embedding
entry) and `feature_attention_mask` (B, T), used for masked mean pooling (pipeline.embed).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import ModelLoadError, redact
from pipeline.registry import MODEL_TYPES, ModelSpec

CODE_SUFFIX = ".py"
MODEL_CARD = "README.md"
COMMIT = re.compile(r"^[0-9a-f]{40}$")
PROBE_S = 2.0  # seconds of audio the loader runs once, to check the states, width and frame rate
FLAG = "--trust-remote-code"


@dataclass(frozen=True)
class RemoteModel:
    model: Any  # the checkpoint's own torch module, eval mode, CPU, float32
    processor: Any  # its own feature extractor
    spec: ModelSpec
    code_hash: str  # sha256 over the code files (names and bytes)
    licence: str | None


def needs_own_code(config: dict) -> bool:
    """True for a config.json whose model type is not built natively and that maps to its own code."""
    return str(config.get("model_type")) not in MODEL_TYPES and bool(config.get("auto_map"))


def require_opt_in(what: str, trust_remote_code: bool) -> None:
    """A checkpoint that runs its own code is refused unless the run opted in."""
    if not trust_remote_code:
        raise ModelLoadError(
            f"{what} ships its own model code (it is not a transformers class): to run it, pass {FLAG} (YAML "
            "trust_remote_code: true) with a pinned checkpoint. The code runs with the job's credentials and "
            "hub token in reach: read it first"
        )


def check_pinned(kind: str, target: str, revision: str | None) -> None:
    """Remote code only from a pinned checkpoint: a hub id at a 40-hex commit, or a local/object-storage copy."""
    if kind == "hub" and not (revision and COMMIT.match(revision)):
        got = f"@{revision}" if revision else "no revision"
        raise ModelLoadError(
            f"{target} ({got}): {FLAG} runs the checkpoint's own code, so the code must be pinned: give the hub "
            f"id at a commit, {target}@<40-hex commit hash> (the hub page's 'History' lists them), or a local "
            "or object-storage copy of the snapshot"
        )


def code_files(local_dir: str) -> list[str]:
    """The checkpoint's code files (top-level *.py), sorted by name."""
    return sorted(n for n in os.listdir(local_dir) if n.endswith(CODE_SUFFIX) and not n.startswith("."))


def code_hash(local_dir: str) -> str:
    """sha256 over the code files, by name and bytes: a changed file is another model."""
    h = hashlib.sha256()
    for name in code_files(local_dir):
        h.update(name.encode() + b"\0")
        with open(os.path.join(local_dir, name), "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()


def _auto_map_entries(*configs: dict | None) -> list[tuple[str, str]]:
    out = []
    for cfg in configs:
        for key, value in ((cfg or {}).get("auto_map") or {}).items():
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if v is not None:
                    out.append((key, str(v)))
    return out


def check_auto_map(local_dir: str, config: dict, preprocessor: dict | None, where: str) -> None:
    """Every auto_map entry must name a module of this checkpoint (module.Class), never another repository."""
    entries = _auto_map_entries(config, preprocessor)
    if not any(k == "AutoModel" for k, _ in entries):
        raise ModelLoadError(f"{where}: config.json auto_map has no AutoModel entry: nothing to load")
    present = set(code_files(local_dir))
    for key, value in entries:
        if "--" in value:
            raise ModelLoadError(
                f"{where}: auto_map {key} = {value!r} points at another repository's code; only code shipped in "
                "the checkpoint itself (pinned with it) is run"
            )
        module, _, cls = value.rpartition(".")
        if not module or not cls or f"{module}{CODE_SUFFIX}" not in present:
            raise ModelLoadError(
                f"{where}: auto_map {key} = {value!r} names no code file of the checkpoint "
                f"(it holds {', '.join(sorted(present)) or 'none'})"
            )


def licence_of(local_dir: str, spec: ModelSpec | None) -> str | None:
    """The registry's licence, else the `license:` of the model card's front matter (README.md)."""
    if spec is not None and spec.licence:
        return spec.licence
    path = os.path.join(local_dir, MODEL_CARD)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(65536)
    except OSError:
        return None
    m = re.match(r"^---\s*\n(.*?)\n---", text, re.S)
    if not m:
        return None
    found = re.search(r"^license:\s*['\"]?([^'\"\n]+?)['\"]?\s*$", m.group(1), re.M)
    return found.group(1) if found else None


def _versions_hint(config: dict) -> str:
    import torch
    import transformers

    theirs = config.get("transformers_version")
    return (
        f"this pipeline runs transformers {transformers.__version__} and torch {torch.__version__}"
        + (f"; the checkpoint was written with transformers {theirs}" if theirs else "")
        + ". Workaround: run the pipeline in an environment with the versions the model card pins (its own "
        "image or virtual environment), or ask the model's authors for code that runs on transformers "
        f"{transformers.__version__}"
    )


def load_remote(
    local_dir: str,
    config: dict,
    preprocessor: dict | None,
    *,
    where: str,
    registered: ModelSpec | None,
    trust_remote_code: bool,
    expected_code_hash: str | None = None,
) -> RemoteModel:
    """Load a checkpoint's own model and processor. Raises ModelLoadError (a systemic failure: the run stops
    before any input) when the flag is missing, the code changed or the code cannot run here."""
    require_opt_in(
        f"{where}: config.json model_type {config.get('model_type')!r} is not a supported architecture of the "
        f"native path (expected one of {sorted(MODEL_TYPES)}), and its auto_map says the checkpoint",
        trust_remote_code,
    )
    check_auto_map(local_dir, config, preprocessor, where)
    digest = code_hash(local_dir)
    if expected_code_hash is not None and digest != expected_code_hash:
        raise ModelLoadError(
            f"{where}: this node's copy of the checkpoint's code has hash {digest[:16]}, the driver checked "
            f"{expected_code_hash[:16]}: the staged files differ; clear the model cache on this node and rerun"
        )
    import torch
    from transformers import AutoFeatureExtractor, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    secrets = [os.environ.get("HF_TOKEN") or ""]
    try:
        model = AutoModel.from_pretrained(local_dir, trust_remote_code=trust_remote_code)
        processor = AutoFeatureExtractor.from_pretrained(local_dir, trust_remote_code=trust_remote_code)
        model = model.to(dtype=torch.float32).eval()
        states, dim, frames = _probe(model, processor)
    except ModelLoadError:
        raise
    except Exception as exc:
        msg = redact(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", secrets)
        raise ModelLoadError(
            f"{where}: the checkpoint's own code failed to load or run ({msg}): " + _versions_hint(config)
        ) from exc
    rate = int(getattr(processor, "sampling_rate", 0) or config.get("sample_rate") or 0)
    if registered is not None:
        if (states, dim, rate) != (registered.num_hidden_states, registered.dim, registered.sample_rate):
            raise ModelLoadError(
                f"{where}: the model gives {states} hidden states of width {dim} at {rate} Hz; the registry says "
                f"{registered.num_hidden_states} x {registered.dim} at {registered.sample_rate} Hz for "
                f"{registered.name}: this is not that model"
            )
        spec = registered
    else:
        if rate <= 0:
            raise ModelLoadError(f"{where}: its processor declares no sampling_rate")
        name = os.path.basename(os.path.normpath(local_dir))
        spec = ModelSpec(
            name=name,
            hub_id=None,
            sample_rate=rate,
            frame_rate=round(frames / PROBE_S, 3),
            num_hidden_states=states,
            dim=dim,
            family="remote",
            pre_ln=False,
            input_state=False,
            licence=licence_of(local_dir, None),
            remote_code=True,
        )
    return RemoteModel(model, processor, spec, digest, licence_of(local_dir, spec))


def _probe(model: Any, processor: Any) -> tuple[int, int, int]:
    """(hidden states, width, frames) of PROBE_S seconds of noise: the interface the pipeline relies on."""
    import torch

    rate = int(processor.sampling_rate)
    x = np.random.default_rng(0).standard_normal(int(PROBE_S * rate)).astype(np.float32) * 0.1
    with torch.inference_mode():
        inputs = processor(x, sampling_rate=rate, return_tensors="pt")
        out = model(**inputs, output_hidden_states=True)
    hidden = getattr(out, "hidden_states", None)
    mask = getattr(out, "feature_attention_mask", None)
    if not hidden or mask is None:
        raise ModelLoadError(
            "the model's output has no hidden_states or no feature_attention_mask: not the MERT-v2 interface "
            "(model(**inputs, output_hidden_states=True) must return both)"
        )
    return len(hidden), int(hidden[0].shape[-1]), int(mask[0].sum())
