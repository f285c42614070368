"""The model layer: find a MERT checkpoint, stage it on this node, and build transformers' model from it.

A checkpoint is a directory (local, on the hub, or under an fsspec prefix) holding `config.json`,
`preprocessor_config.json` and the weights (`model.safetensors`, else `pytorch_model.bin`). Released MERT
configs declare `model_type` `mert_model` (older: `music_hubert`, `hubert`) with an `auto_map` to remote code;
their weights are exactly a transformers `HubertModel` of the same config, so the remote code is never run: the
model is built from config.json alone. music2vec-v1 is a stock `Data2VecAudioModel`.

Loading is strict (every key present, none extra, every shape right); a pickle is only read with
`torch.load(..., weights_only=True)`. Every failure is a `ModelLoadError` naming the path and what to do.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ModelLoadError, redact
from pipeline.registry import (
    MODEL_TYPES,
    REGISTRY,
    ModelSpec,
    by_hub_id,
    conv_receptive_field,
    spec_from_config,
)
from pipeline.remote_code import (
    CODE_SUFFIX,
    MODEL_CARD,
    check_pinned,
    code_files,
    load_remote,
    needs_own_code,
    require_opt_in,
)
from pipeline.storage import canonical_uri, get_fs, scheme_of

# torch is imported where a model is built or read: a driver whose model check is cached imports none
if TYPE_CHECKING:
    import torch

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
SAFETENSORS_FILE = "model.safetensors"
BIN_FILE = "pytorch_model.bin"
WEIGHT_FILES = (SAFETENSORS_FILE, BIN_FILE)  # in order of preference
CHECKPOINT_FILES = (CONFIG_FILE, PREPROCESSOR_FILE, *WEIGHT_FILES)
# Larger checkpoints (MERT-v2's own-code ones may be) split safetensors into shards named by an index.
SHARD_INDEX = "model.safetensors.index.json"
_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

# Weight-norm parameter names of the positional conv: transformers <= 4.2x (which wrote the published files)
# used torch.nn.utils.weight_norm; newer versions use the parametrizations API.
WEIGHT_NORM_NAMES = {
    "weight_g": "parametrizations.weight.original0",
    "weight_v": "parametrizations.weight.original1",
}

# Used only at training time (SpecAugment); some exports omit it. Never influences inference.
OPTIONAL_KEYS = ("masked_spec_embed",)

# Config switches of the original MERT code that no released checkpoint turns on and transformers cannot build.
REFUSED_SWITCHES = {
    "feature_extractor_cqt": "the CQT feature branch",
    "deepnorm": "DeepNorm residual scaling",
}

# Generic PretrainedConfig entries that describe the saving context, not the architecture.
_CONFIG_DROP = {
    "architectures",
    "auto_map",
    "model_type",
    "transformers_version",
    "_name_or_path",
    "torch_dtype",
    "dtype",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "tie_last_hidden_states",
    "id2label",
    "label2id",
    "problem_type",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "num_feat_extract_layers",
    "_attn_implementation",
    "attn_implementation",
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SECRET_WORDS = ("key", "secret", "token", "password", "credential", "sas", "session")
_ENV_CACHE = "MERT_PIPELINE_CACHE"


@dataclass(frozen=True)
class LoadedModel:
    """A built model and everything needed to describe where its numbers came from."""

    spec: ModelSpec  # registry facts (registered names/hub ids) or derived by registry.spec_from_config
    # transformers HubertModel or Data2VecAudioModel, eval mode, CPU, float32; None from a check_only load
    model: torch.nn.Module | None
    config: dict  # the raw config.json
    do_normalize: bool  # preprocessor_config.json do_normalize (False when absent)
    source: str  # what was asked for: registry name, "m-a-p/X@rev", local dir, or fsspec prefix
    revision: str | None  # hub commit hash when loaded from the hub, else None
    content_hash: str  # sha256 hex over config.json + preprocessor_config.json + the weight file (+ code)
    local_dir: str  # where the files are on this node
    processor: Any = None  # a checkpoint with its own code: its own feature extractor (pipeline.remote_code)
    code_hash: str | None = None  # ... and the hash of its code files; None for the native models
    licence: str | None = None  # SPDX id from the registry or the model card, when known

    @property
    def remote(self) -> bool:
        """The model runs its checkpoint's own code (opt-in, pinned): pipeline.remote_code."""
        return self.code_hash is not None


# ----------------------------------------------------------------------------------------------------------------
# Frame counts


def num_frames(num_samples: int, config: dict) -> int:
    """Hidden-state frames the conv front end makes of `num_samples` samples; 0 when too short for one frame.

    Per conv layer: floor((L - kernel) / stride) + 1 (no padding). `config` is the raw config.json.
    """
    kernels, strides = config.get("conv_kernel"), config.get("conv_stride")
    if not kernels or not strides or len(kernels) != len(strides):
        raise ValueError("config.json must list conv_kernel and conv_stride of equal length")
    n = int(num_samples)
    for k, s in zip(kernels, strides, strict=True):
        if n < k:
            return 0
        n = (n - k) // s + 1
    return n


def receptive_field(config: dict) -> int:
    """The fewest samples that give one frame (the conv front end's receptive field)."""
    return conv_receptive_field(config["conv_kernel"], config["conv_stride"])


# ----------------------------------------------------------------------------------------------------------------
# Resolving a reference to a local directory


@dataclass(frozen=True)
class _Ref:
    kind: str  # "hub" | "local" | "remote"
    target: str  # hub id, absolute local path, or canonical URI
    revision: str | None  # requested hub revision (branch, tag or commit)
    registered: ModelSpec | None  # the registry entry when a registered name or hub id was asked for


def _parse_ref(ref: str) -> _Ref:
    if not isinstance(ref, str) or not ref.strip():
        raise ModelLoadError(
            f"model reference {ref!r} is empty: give a registry name ({', '.join(REGISTRY)}), "
            "a hub id, a local directory or an object-storage prefix"
        )
    ref = ref.strip()
    scheme = scheme_of(ref)
    if scheme != "file":
        return _Ref("remote", canonical_uri(ref).rstrip("/"), None, None)
    path = ref[len("file://") :] if ref.startswith("file://") else ref
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        return _Ref("local", path, None, None)
    name, _, rev = ref.partition("@")
    revision = rev or None
    if name in REGISTRY:
        return _Ref("hub", REGISTRY[name].hub_id or name, revision, REGISTRY[name])
    if _HUB_ID.match(name) and not ref.startswith(("/", ".", "~", "file://")):
        return _Ref("hub", name, revision, by_hub_id(name))
    raise ModelLoadError(
        f"{ref}: no such directory, and not a registry name ({', '.join(REGISTRY)}) or a hub id: "
        "give a directory holding config.json and the weights, or an object-storage prefix (s3://...)"
    )


def default_cache_dir() -> str:
    """Where remote checkpoints are staged: $MERT_PIPELINE_CACHE or ~/.cache/mert-pipeline/models."""
    return os.environ.get(_ENV_CACHE) or os.path.join(
        os.path.expanduser("~"), ".cache", "mert-pipeline", "models"
    )


def resolve_model_dir(
    ref: str, storage_options: dict | None = None, cache_dir: str | None = None
) -> tuple[str, str | None]:
    """ref -> (local directory holding the checkpoint files, hub commit hash or None).

    ref: a registry name ("MERT-v1-95M" -> its hub id), a hub id with optional "@revision", a local directory,
    or an fsspec URI prefix (s3://bucket/models/MERT-v1-95M/) holding config.json, preprocessor_config.json and
    the weights. Hub checkpoints go through huggingface_hub's own cache. Remote prefixes are staged once per
    node into `cache_dir` (default `default_cache_dir()`), keyed by the URI and the objects' sizes and ETags so
    that a changed checkpoint is staged again; concurrent loads on one node download once (file lock, download
    into a temporary directory, atomic rename).
    """
    parsed = _parse_ref(ref)
    if parsed.kind == "local":
        return parsed.target, None
    if parsed.kind == "hub":
        return _hub_snapshot(parsed, weights=True)
    return _stage_remote(parsed.target, storage_options, cache_dir or default_cache_dir()), None


def _hub_error(parsed: _Ref, exc: BaseException) -> ModelLoadError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    what = parsed.target + (f"@{parsed.revision}" if parsed.revision else "")
    if isinstance(exc, RevisionNotFoundError):
        return ModelLoadError(
            f"{what}: the hub has no revision {parsed.revision!r}: check the branch, tag or commit"
        )
    if isinstance(exc, (RepositoryNotFoundError, GatedRepoError)):
        return ModelLoadError(
            f"{what}: the hub refuses or has no such repository ({type(exc).__name__}): "
            "check the id and the HF_TOKEN"
        )
    return ModelLoadError(
        f"{what}: the model hub is unreachable and the checkpoint is not in the local hub cache "
        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Clusters often cannot reach "
        "the hub: copy config.json, preprocessor_config.json and the weights to a local directory or an "
        "object-storage prefix (s3://bucket/models/NAME/) and pass that instead"
    )


def _hub_snapshot(parsed: _Ref, weights: bool) -> tuple[str, str | None]:
    """Download (or find in huggingface_hub's cache) just the checkpoint files of a hub repository."""
    from huggingface_hub import snapshot_download

    # the code files and the model card come along: never run for the native models, and small
    patterns = [CONFIG_FILE, PREPROCESSOR_FILE, "*.py", MODEL_CARD]
    if weights:
        patterns += [SAFETENSORS_FILE, SHARD_INDEX, "model-*-of-*.safetensors"]
    try:
        folder = snapshot_download(parsed.target, revision=parsed.revision, allow_patterns=patterns)
        single_or_sharded = (SAFETENSORS_FILE, SHARD_INDEX)
        if weights and not any(os.path.exists(os.path.join(folder, n)) for n in single_or_sharded):
            folder = snapshot_download(parsed.target, revision=parsed.revision, allow_patterns=[BIN_FILE])
    except Exception as exc:  # the hub client raises many types for "offline"; all end in one clear message
        raise _hub_error(parsed, exc) from exc
    revision = os.path.basename(os.path.normpath(folder))
    return folder, revision


def _secrets(options: dict | None) -> list[str]:
    out: list[str] = []
    for k, v in (options or {}).items():
        if isinstance(v, dict):
            out += _secrets(v)
        elif isinstance(v, str) and any(w in k.lower() for w in _SECRET_WORDS):
            out.append(v)
    return out


def _list_remote(uri: str, storage_options: dict | None) -> tuple[Any, str, dict[str, dict]]:
    """(filesystem, root path, {file name: listing entry}) of the checkpoint files under a prefix."""
    secrets = _secrets(storage_options)
    try:
        fs, root = get_fs(uri, storage_options)
    except ImportError as exc:
        raise ModelLoadError(f"{uri}: {exc}") from exc
    root = root.rstrip("/")
    try:
        fs.invalidate_cache(root)  # a re-uploaded checkpoint must be seen as changed
        entries = fs.ls(root, detail=True)
    except FileNotFoundError as exc:
        raise ModelLoadError(
            f"{uri}: no such prefix: check the URI (it must hold {CONFIG_FILE} and the weights)"
        ) from exc
    except Exception as exc:
        msg = redact(f"{type(exc).__name__}: {exc}", secrets)
        raise ModelLoadError(
            f"{uri}: cannot list the checkpoint prefix ({msg}): check the URI, the "
            "credentials and the storage options"
        ) from exc
    files = {}
    for e in entries:
        name = e.get("name", "").rstrip("/").rsplit("/", 1)[-1]
        if e.get("type") == "file" and (name in CHECKPOINT_FILES or _is_extra_file(name)):
            files[name] = e
    if CONFIG_FILE not in files:
        raise ModelLoadError(
            f"{uri}: no {CONFIG_FILE} under this prefix: a checkpoint directory holds "
            f"{CONFIG_FILE}, {PREPROCESSOR_FILE} and {SAFETENSORS_FILE} or {BIN_FILE}"
        )
    return fs, root, files


def _is_extra_file(name: str) -> bool:
    """Staged with a checkpoint besides its configs and single weight file: its own code (run only through
    pipeline.remote_code), its model card (the licence), and sharded safetensors with their index."""
    if name in (MODEL_CARD, SHARD_INDEX) or _SHARD.match(name):
        return True
    return name.endswith(CODE_SUFFIX) and "/" not in name and not name.startswith(".")


def _stage_remote(uri: str, storage_options: dict | None, cache_dir: str) -> str:
    fs, root, files = _list_remote(uri, storage_options)
    weight = next((w for w in WEIGHT_FILES if w in files), None)
    if weight is None and SHARD_INDEX not in files:
        raise ModelLoadError(
            f"{uri}: no weights file under this prefix: expected {SAFETENSORS_FILE} or {BIN_FILE}"
        )
    wanted = [n for n in (CONFIG_FILE, PREPROCESSOR_FILE, weight) if n is not None and n in files]
    wanted += sorted(n for n in files if _is_extra_file(n))
    fingerprint = [
        (
            n,
            int(files[n].get("size") or 0),
            str(
                files[n].get("ETag")
                or files[n].get("etag")
                or files[n].get("mtime")
                or files[n].get("LastModified")
            ),
        )
        for n in wanted
    ]
    key = hashlib.sha256(json.dumps([uri, fingerprint]).encode()).hexdigest()[:32]
    final = os.path.join(cache_dir, key)
    marker = os.path.join(final, ".complete")
    if os.path.exists(marker):
        return final
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, f".{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one downloader per node; the others wait and then reuse its copy
        try:
            if os.path.exists(marker):
                return final
            tmp = tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache_dir)
            try:
                for name in wanted:
                    fs.get_file(f"{root}/{name}", os.path.join(tmp, name))
                    got = os.path.getsize(os.path.join(tmp, name))
                    if files[name].get("size") is not None and got != int(files[name]["size"]):
                        raise OSError(f"{name}: got {got} bytes, expected {files[name]['size']}")
                with open(os.path.join(tmp, ".complete"), "w") as f:
                    json.dump({"uri": uri, "files": fingerprint}, f)
                if os.path.exists(final):  # a leftover without its marker (not ours: we hold the lock)
                    shutil.rmtree(final)
                os.rename(tmp, final)
            except Exception as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                msg = redact(f"{type(exc).__name__}: {exc}", _secrets(storage_options))
                raise ModelLoadError(
                    f"{uri}: cannot stage the checkpoint into {cache_dir} ({msg}): check the "
                    "storage options and the free disk space"
                ) from exc
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


# ----------------------------------------------------------------------------------------------------------------
# Configs


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _local_configs(local_dir: str) -> tuple[dict, dict | None]:
    cfg_path = os.path.join(local_dir, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise ModelLoadError(
            f"{local_dir}: no {CONFIG_FILE}: a checkpoint directory holds {CONFIG_FILE}, "
            f"{PREPROCESSOR_FILE} and {SAFETENSORS_FILE} or {BIN_FILE}"
        )
    pre_path = os.path.join(local_dir, PREPROCESSOR_FILE)
    return _read_json(cfg_path), (_read_json(pre_path) if os.path.isfile(pre_path) else None)


# Bounds on the sizes in a config.json, checked before anything is built: generous over the released models
# (MERT-v1-330M: hidden 1024, 24 layers, 16 heads, FFN 4096; every model: 7 convs of 512 channels, kernels <= 10,
# strides <= 5, a 400-sample receptive field), so that a hostile or mistyped config fails in milliseconds with a
# clear message instead of allocating gigabytes first. Whole numbers (not bools), inclusive.
CONFIG_INT_BOUNDS: dict[str, tuple[int, int]] = {
    "hidden_size": (1, 4096),
    "num_hidden_layers": (1, 64),
    "num_attention_heads": (1, 128),
    "intermediate_size": (1, 16384),
    "num_conv_pos_embeddings": (1, 1024),  # HuBERT: the positional conv's kernel; data2vec: stacked pos convs
    "num_conv_pos_embedding_groups": (1, 4096),
    "conv_pos_kernel_size": (1, 1024),  # data2vec's positional convs
    "output_hidden_size": (1, 4096),
    "num_adapter_layers": (0, 16),
    "adapter_kernel_size": (1, 1024),
    "adapter_stride": (1, 1024),
    "sample_rate": (1000, 192000),
}
CONFIG_LIST_BOUNDS: dict[str, tuple[int, int]] = {  # per element; 1..CONV_LAYERS_MAX elements, equal lengths
    "conv_dim": (1, 4096),
    "conv_kernel": (1, 1024),
    "conv_stride": (1, 1024),
}
CONV_LAYERS_MAX = 16
RECEPTIVE_FIELD_MAX = 48000  # samples for one frame (the real models: 400); 1 s at 48 kHz, 2 s at 24 kHz
PARAMETERS_MAX = 3_000_000_000  # the sizes together (the largest released model: 330M; MERT-v2: 632M)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_config_bounds(config: dict, where: str) -> None:
    """Refuse sizes that no real checkpoint has (a ModelLoadError naming the checkpoint, the field, its value and
    the allowed range), before the model is built. Fields absent from config.json take transformers' defaults."""

    def whole(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for field, (lo, hi) in CONFIG_INT_BOUNDS.items():
        if field in config:
            v = config[field]
            if not (whole(v) and lo <= v <= hi):
                raise ModelLoadError(
                    f"{where}: config.json {field}={_short(v)} is out of range: must be a whole number in "
                    f"[{lo}, {hi}]; fix the checkpoint's config.json"
                )
    lengths = {}
    for field, (lo, hi) in CONFIG_LIST_BOUNDS.items():
        if field in config:
            v = config[field]
            if not (isinstance(v, list) and 1 <= len(v) <= CONV_LAYERS_MAX):
                raise ModelLoadError(
                    f"{where}: config.json {field}={_short(v)}: must be a list of 1 to {CONV_LAYERS_MAX} whole "
                    f"numbers, one per conv layer"
                )
            bad = [x for x in v if not (whole(x) and lo <= x <= hi)]
            if bad:
                raise ModelLoadError(
                    f"{where}: config.json {field}={_short(v)} is out of range: each entry must be a whole number "
                    f"in [{lo}, {hi}] (got {_short(bad[0])})"
                )
            lengths[field] = len(v)
    if len(set(lengths.values())) > 1:
        raise ModelLoadError(
            f"{where}: config.json conv_dim, conv_kernel and conv_stride must have one entry per conv layer; "
            f"lengths are {lengths}"
        )
    hidden = config.get("hidden_size")
    for field in ("num_attention_heads", "num_conv_pos_embedding_groups"):
        if hidden is not None and field in config and hidden % config[field]:
            raise ModelLoadError(
                f"{where}: config.json {field}={config[field]} does not divide hidden_size={hidden}: "
                "fix the checkpoint's config.json"
            )
    if "conv_kernel" in config and "conv_stride" in config:
        samples = receptive_field(config)
        if samples > RECEPTIVE_FIELD_MAX:
            raise ModelLoadError(
                f"{where}: config.json conv_kernel={_short(config['conv_kernel'])} and conv_stride="
                f"{_short(config['conv_stride'])} need {samples} samples for one frame: at most "
                f"{RECEPTIVE_FIELD_MAX} allowed (the released models need 400)"
            )
    params = _parameter_estimate(config)
    if params > PARAMETERS_MAX:
        raise ModelLoadError(
            f"{where}: config.json sizes (hidden_size, num_hidden_layers, intermediate_size, conv_dim, "
            f"conv_kernel, positional conv) describe about {params:.3g} parameters: at most {PARAMETERS_MAX:.3g} "
            "allowed (MERT-v1-330M has 3.3e8); fix the checkpoint's config.json"
        )


def _parameter_estimate(config: dict) -> float:
    """About how many weights a (bounds-checked) config describes; transformers' defaults where absent."""
    h = config.get("hidden_size", 768)
    layers = config.get("num_hidden_layers", 12)
    ffn = config.get("intermediate_size", 4 * h)
    dims = config.get("conv_dim", [512] * 7)
    kernels = config.get("conv_kernel", [10, 3, 3, 3, 3, 2, 2])
    conv = sum(c_in * c_out * k for c_in, c_out, k in zip([1, *dims[:-1]], dims, kernels, strict=False))
    groups = config.get("num_conv_pos_embedding_groups", 16)
    if "conv_pos_kernel_size" in config or config.get("model_type") == "data2vec-audio":
        pos = (
            config.get("num_conv_pos_embeddings", 5)
            * h
            * (h // groups)
            * config.get("conv_pos_kernel_size", 19)
        )
    else:
        pos = h * (h // groups) * config.get("num_conv_pos_embeddings", 128)
    return float(layers * (4 * h * h + 2 * h * ffn) + conv + pos + dims[-1] * h)


def _check_config(config: dict, where: str) -> str:
    """The architecture family of a config.json; refuses unknown types, switches transformers cannot build and
    sizes out of bounds (check_config_bounds), all before anything is built."""
    model_type = config.get("model_type")
    family = MODEL_TYPES.get(str(model_type))
    if family is None:
        raise ModelLoadError(
            f"{where}: config.json model_type {model_type!r} (architectures {config.get('architectures')}) is "
            f"not a supported architecture: expected one of {sorted(MODEL_TYPES)}"
        )
    for switch, what in REFUSED_SWITCHES.items():
        if config.get(switch):
            raise ModelLoadError(
                f"{where}: config.json sets {switch}=true ({what}); no released MERT checkpoint uses it and it "
                "cannot be built without the authors' remote code, which this pipeline never runs"
            )
    check_config_bounds(config, where)
    return family


def _spec(config: dict, preprocessor: dict | None, parsed: _Ref, where: str) -> ModelSpec:
    rate = (preprocessor or {}).get("sampling_rate")
    if config.get("sample_rate") and rate and int(config["sample_rate"]) != int(rate):
        raise ModelLoadError(
            f"{where}: config.json sample_rate {config['sample_rate']} disagrees with "
            f"{PREPROCESSOR_FILE} sampling_rate {rate}: fix the checkpoint"
        )
    name = parsed.registered.name if parsed.registered else parsed.target
    try:
        spec = spec_from_config(name, config, rate)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{where}: {exc}") from exc
    reg = parsed.registered
    if reg is not None:
        got = (spec.num_hidden_states, spec.dim, spec.sample_rate, spec.frame_rate, spec.family, spec.pre_ln)
        want = (reg.num_hidden_states, reg.dim, reg.sample_rate, reg.frame_rate, reg.family, reg.pre_ln)
        if got != want:
            raise ModelLoadError(
                f"{where}: the checkpoint does not match the registry entry {reg.name}: (hidden states, dim, "
                f"sample rate, frame rate, family, pre-LN) = {got}, expected {want}; load it by its path instead"
            )
        return reg
    return spec


def read_model_config(
    ref: str, storage_options: dict | None = None, cache_dir: str | None = None
) -> tuple[ModelSpec, dict, bool]:
    """(spec, raw config.json, do_normalize) without fetching or loading the weights (dry runs, driver checks)."""
    parsed = _parse_ref(ref)
    if parsed.kind == "local":
        config, pre = _local_configs(parsed.target)
    elif parsed.kind == "hub":
        folder, _ = _hub_snapshot(parsed, weights=False)
        config, pre = _local_configs(folder)
    else:
        fs, root, files = _list_remote(parsed.target, storage_options)
        try:
            config = json.loads(fs.cat_file(f"{root}/{CONFIG_FILE}"))
            pre = (
                json.loads(fs.cat_file(f"{root}/{PREPROCESSOR_FILE}")) if PREPROCESSOR_FILE in files else None
            )
        except Exception as exc:
            msg = redact(f"{type(exc).__name__}: {exc}", _secrets(storage_options))
            raise ModelLoadError(f"{parsed.target}: cannot read the checkpoint configs ({msg})") from exc
    _check_config(config, ref)
    spec = _spec(config, pre, parsed, ref)
    return spec, config, bool((pre or {}).get("do_normalize", False))


# ----------------------------------------------------------------------------------------------------------------
# Building and loading


def torch_build() -> dict[str, str | None]:
    """torch's version with its build tag (2.11.0+cu130) and its CUDA version (None on a CPU build), as
    `torch.__version__` and `torch.version.cuda` give them, without importing torch (about 2 CPU s) in a process
    that has not: a driver whose model check is cached. Read from the literals of torch/version.py, the module
    both come from; torch itself when it is imported already or the file does not read."""
    import sys

    if "torch" not in sys.modules:
        import ast
        import importlib.util

        try:
            spec = importlib.util.find_spec("torch")
            where = Path(next(iter(spec.submodule_search_locations or []))) / "version.py"  # type: ignore[union-attr]
            found: dict[str, str | None] = {}
            for node in ast.parse(where.read_text()).body:
                target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
                value = getattr(node, "value", None)
                if isinstance(target, ast.Name) and isinstance(value, ast.Constant):
                    if value.value is None or isinstance(value.value, str):
                        found[target.id] = value.value
            version = found.get("__version__")
            if version:
                return {"torch": version, "cuda": found.get("cuda")}
        except (AttributeError, OSError, StopIteration, SyntaxError, ValueError):
            pass
    import torch

    return {"torch": str(torch.__version__), "cuda": torch.version.cuda}


def ensure_cwd() -> None:
    """transformers resolves a relative path when it is first imported (`Path("src").resolve()`), which fails
    in a process whose current directory is gone: a Ray job's driver or worker after Ray replaced the job's
    working directory. Such a process moves to the temporary directory; nothing relative could be read anyway."""
    try:
        os.getcwd()
    except FileNotFoundError:
        os.chdir(tempfile.gettempdir())


def build_model(config: dict, where: str = "config.json") -> torch.nn.Module:
    """transformers' HubertModel or Data2VecAudioModel built from a raw config.json dict (weights uninitialized).

    Remote-code entries (auto_map, MERT-only switches such as attention_relax) are ignored; SDPA attention.
    """
    from transformers import Data2VecAudioConfig, Data2VecAudioModel, HubertConfig, HubertModel
    from transformers.initialization import no_init_weights

    family = _check_config(config, where)
    cfg_cls: Any
    model_cls: Any
    cfg_cls, model_cls = (
        (HubertConfig, HubertModel) if family == "hubert" else (Data2VecAudioConfig, Data2VecAudioModel)
    )
    allowed = _config_fields(cfg_cls)
    kwargs = {k: v for k, v in config.items() if k in allowed}
    try:
        cfg = cfg_cls(**kwargs, attn_implementation="sdpa")
        groups = cfg.num_conv_pos_embedding_groups
        if cfg.hidden_size % groups or cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(
                f"hidden_size {cfg.hidden_size} must be divisible by num_conv_pos_embedding_groups "
                f"{groups} and num_attention_heads {cfg.num_attention_heads}"
            )
        with no_init_weights():
            model = model_cls(cfg)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(
            f"{where}: config.json does not describe a buildable {family} model: {exc}"
        ) from exc
    return model.eval()


_FIELDS: dict[type, frozenset[str]] = {}


def _config_fields(cfg_cls: type) -> frozenset[str]:
    if cfg_cls not in _FIELDS:
        _FIELDS[cfg_cls] = frozenset(cfg_cls().to_dict()) - _CONFIG_DROP
    return _FIELDS[cfg_cls]


def weights_path(local_dir: str) -> str:
    """The weight file of a checkpoint directory: model.safetensors preferred, else pytorch_model.bin."""
    for name in WEIGHT_FILES:
        path = os.path.join(local_dir, name)
        if os.path.isfile(path):
            return path
    present = sorted(os.listdir(local_dir)) if os.path.isdir(local_dir) else []
    raise ModelLoadError(
        f"{local_dir}: no weights file: expected {SAFETENSORS_FILE} or {BIN_FILE} (found {present[:10]})"
    )


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} state dict from safetensors, or from a .bin through torch.load(weights_only=True)."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as exc:
            raise ModelLoadError(
                f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})"
            ) from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"{path}: refused by torch.load(weights_only=True) ({type(exc).__name__}: {first[:300]}). The file "
            "holds more than tensors; it is never unpickled in full. Re-save the model's state dict "
            f"(or convert it to {SAFETENSORS_FILE}) from a trusted environment"
        ) from exc
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        keys = list(obj)[:6] if isinstance(obj, dict) else []
        raise ModelLoadError(
            f"{path}: not a plain state dict of tensors (a {type(obj).__name__}"
            + (f" with keys {keys}" if keys else "")
            + "; a training checkpoint?). Save just model.state_dict() as pytorch_model.bin or model.safetensors"
        )
    return obj


def adapt_state_dict(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename weight-norm keys to the built model's names and strip a head model's prefix ("hubert.")."""
    model_keys = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "") + "."
    if prefix != "." and state and all(k.startswith(prefix) for k in state) and not (set(state) & model_keys):
        state = {k[len(prefix) :]: v for k, v in state.items()}
    uses_param = any(k.endswith(WEIGHT_NORM_NAMES["weight_g"]) for k in model_keys)
    out = {}
    for k, v in state.items():
        for old, new in WEIGHT_NORM_NAMES.items():
            if uses_param and k.endswith("." + old):
                k = k[: -len(old)] + new
            elif not uses_param and k.endswith("." + new):
                k = k[: -len(new)] + old
        out[k] = v
    return out


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """Strict load: any missing or unexpected key, or a shape mismatch, is a ModelLoadError listing them."""
    import torch

    state = adapt_state_dict(state, model)
    expected = model.state_dict()
    for k in OPTIONAL_KEYS:  # training-only; keep the files of exporters that drop (or add) it loadable
        if k in expected and k not in state:
            state[k] = torch.zeros_like(expected[k])
        if k in state and k not in expected:
            state.pop(k)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys {missing[:5]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys {unexpected[:5]}")
        raise ModelLoadError(
            f"{path}: the weights do not fit the model config.json describes: "
            + "; ".join(parts)
            + ": the config and the weights must come from the same checkpoint"
        )
    bad = [
        f"{k} {tuple(state[k].shape)} (model expects {tuple(v.shape)})"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if bad:
        raise ModelLoadError(
            f"{path}: {len(bad)} tensors have the wrong shape for the model config.json describes: {bad[:5]}"
        )
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------------------------------------
# Content hash


_HASHES: dict[tuple, str] = {}
_HASH_LOCK = threading.Lock()


def content_hash(local_dir: str, code: bool = False) -> str:
    """sha256 over config.json, preprocessor_config.json (when present) and the weight file, by name and bytes;
    with `code`, also the checkpoint's code files (a checkpoint that runs its own code: a changed file is another
    model). The native models' hash covers exactly the files it always did.

    Cached in memory and on disk, keyed by each file's path, size and mtime, so repeated loads are cheap.
    """
    files = [os.path.join(local_dir, CONFIG_FILE)]
    if os.path.isfile(os.path.join(local_dir, PREPROCESSOR_FILE)):
        files.append(os.path.join(local_dir, PREPROCESSOR_FILE))
    if code and not any(os.path.isfile(os.path.join(local_dir, w)) for w in WEIGHT_FILES):
        names = sorted(os.listdir(local_dir))  # sharded: the index and every shard
        files += [os.path.join(local_dir, n) for n in names if n == SHARD_INDEX or _SHARD.match(n)]
    else:
        files.append(weights_path(local_dir))
    if code:
        files += [os.path.join(local_dir, n) for n in code_files(local_dir)]
    key = tuple((os.path.realpath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in files)
    with _HASH_LOCK:
        if key in _HASHES:
            return _HASHES[key]
    side = os.path.join(
        default_cache_dir(), ".hashes", hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]
    )
    try:
        with open(side) as f:
            digest = f.read().strip()
        if re.fullmatch(r"[0-9a-f]{64}", digest):
            with _HASH_LOCK:
                _HASHES[key] = digest
            return digest
    except OSError:
        pass
    h = hashlib.sha256()
    for p in files:
        h.update(os.path.basename(p).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    digest = h.hexdigest()
    with _HASH_LOCK:
        _HASHES[key] = digest
    try:  # best effort: a read-only home only costs a re-hash
        os.makedirs(os.path.dirname(side), exist_ok=True)
        tmp = f"{side}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(digest)
        os.replace(tmp, side)
    except OSError:
        pass
    return digest


# ----------------------------------------------------------------------------------------------------------------
# The entry point


def load_model(
    ref: str,
    storage_options: dict | None = None,
    cache_dir: str | None = None,
    *,
    trust_remote_code: bool = False,
    expected_code_hash: str | None = None,
    check_only: bool = False,
) -> LoadedModel:
    """Resolve, stage, build and strictly load a checkpoint: CPU, float32, eval mode.

    check_only: the driver's check before a run. A native checkpoint that this node has strictly loaded before
    (same content hash, same loader, same transformers) is not built again: the result has `model=None` and every
    other field. The embed actors always build and load strictly.

    ref: see `resolve_model_dir`. A registered name or hub id must build a model matching the registry.
    A checkpoint that ships its own code (MERT-v2) loads only with `trust_remote_code` and a pinned ref, and
    on a worker only when its code hash equals `expected_code_hash` (the driver's): see pipeline.remote_code.
    The flag changes nothing for the natively built models. Raises ModelLoadError naming the path and what to do.
    """
    ensure_cwd()  # before transformers is imported, by the native build or a checkpoint's own code
    parsed = _parse_ref(ref)
    if parsed.registered is not None and parsed.registered.remote_code:  # before anything is downloaded
        require_opt_in(parsed.registered.name, trust_remote_code)
        check_pinned(parsed.kind, parsed.target, parsed.revision)
    local_dir, revision = resolve_model_dir(ref, storage_options, cache_dir)
    where = local_dir if parsed.kind == "local" else f"{ref} ({local_dir})"
    config, pre = _local_configs(local_dir)
    if needs_own_code(config) or (parsed.registered is not None and parsed.registered.remote_code):
        if trust_remote_code:
            check_pinned(parsed.kind, parsed.target, parsed.revision)
        rm = load_remote(
            local_dir,
            config,
            pre,
            where=where,
            registered=parsed.registered,
            trust_remote_code=trust_remote_code,
            expected_code_hash=expected_code_hash,
        )
        return LoadedModel(
            spec=rm.spec,
            model=rm.model,
            config=config,
            do_normalize=False,  # the checkpoint's own processor prepares the input
            source=ref,
            revision=revision,
            content_hash=content_hash(local_dir, code=True),
            local_dir=str(Path(local_dir)),
            processor=rm.processor,
            code_hash=rm.code_hash,
            licence=rm.licence,
        )
    _check_config(config, where)
    spec = _spec(config, pre, parsed, where)
    digest = content_hash(local_dir)
    facts: dict[str, Any] = {
        "config": config,
        "do_normalize": bool((pre or {}).get("do_normalize", False)),
        "source": ref,
        "revision": revision,
        "content_hash": digest,
        "local_dir": str(Path(local_dir)),
        "licence": parsed.registered.licence if parsed.registered is not None else None,
    }
    if check_only and _loaded_before(digest):
        return LoadedModel(spec=spec, model=None, **facts)
    import torch

    model: Any = build_model(config, where)  # HubertModel / Data2VecAudioModel: submodules by name
    wpath = weights_path(local_dir)
    load_weights(model, read_state_dict(wpath), wpath)
    model = model.to(device="cpu", dtype=torch.float32).eval()
    layers = len(model.encoder.layers) + 1
    if layers != spec.num_hidden_states or model.config.hidden_size != spec.dim:
        raise ModelLoadError(
            f"{where}: the built model has {layers} hidden states of width "
            f"{model.config.hidden_size}, the spec says {spec.num_hidden_states} x {spec.dim}"
        )
    _remember_loaded(digest)
    return LoadedModel(spec=spec, model=model, **facts)


@functools.cache
def _loader_identity() -> str:
    """This loader's source and transformers' version: what a strict load's marker holds besides the content."""
    from importlib.metadata import version

    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest() + version("transformers")


def _loaded_mark(digest: str) -> str:
    """The marker of a strict load of the checkpoint with content hash `digest` on this node, by this loader
    (its source) under this transformers: a change to either checks the checkpoint again."""
    key = hashlib.sha256(f"{digest}:{_loader_identity()}".encode()).hexdigest()[:32]
    return os.path.join(default_cache_dir(), ".loaded", key)


def _loaded_before(digest: str) -> bool:
    try:
        return os.path.isfile(_loaded_mark(digest))
    except Exception:  # no marker to read (the loader's source, transformers' metadata): check in full
        return False


def _remember_loaded(digest: str) -> None:
    try:  # best effort, like the hash cache: without it the next check builds the model again
        mark = _loaded_mark(digest)
        os.makedirs(os.path.dirname(mark), exist_ok=True)
        with open(mark, "w") as f:
            f.write(digest)
    except Exception:
        pass
