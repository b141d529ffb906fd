"""Checkpoints made elsewhere (GPT2-chitchat, CDial-GPT2, uer/gpt2-chinese): where they are, and their weights.

- `resolve_model_dir`: a local directory as it is; a Hugging Face hub id (`owner/name`) downloaded through
  huggingface_hub where the network allows, else a UserError saying how to download it and pass the directory.
- `load_pickled_model`: `pytorch_model.bin` read with `torch.load(weights_only=True)` only, so a pickle that
  asks for anything but tensors and plain containers (a `__reduce__` that would run code) is refused before
  any of it runs; every tensor's name, shape and dtype is checked against config.json before it is used.

The tokenizer of such a directory (a BERT-style vocab.txt) is `dialogpt_zh.tokenizer.load_tokenizer`'s, its
input layout `dialogpt_zh.sequence.infer_layout`'s.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

from dialogpt_zh.errors import UserError

log = logging.getLogger(__name__)

PICKLED_WEIGHTS = "pytorch_model.bin"
# what a hub id looks like: owner/name, neither starting with a dot (a relative path such as ./x or ../x)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# the files a model directory needs (no TF/Flax/ONNX weights, no pickled training states)
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             PICKLED_WEIGHTS, "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "dialogpt_zh.json", "LICENSE*", "README.md"]
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
# buffers older transformers saved with GPT-2 weights (the causal mask); today's model rebuilds them
OLD_BUFFERS = (".attn.bias", ".attn.masked_bias")


def looks_like_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec))


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in _OFFLINE_VARS)


def download_advice(hub_id: str) -> str:
    name = hub_id.split("/")[-1]
    return (f"download it where there is network, e.g. `hf download {hub_id} --local-dir models/{name}` "
            f"(or `git clone https://huggingface.co/{hub_id}`), copy that directory here and pass its path")


def resolve_model_dir(spec: str | Path, field: str = "model") -> Path:
    """A local path as it is (when it exists), else a hub id downloaded into the Hugging Face cache.

    No network, or HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set: a UserError naming the id and how to download it.
    """
    if not str(spec).strip():   # Path("") is ".", the current directory: never what an empty value meant
        raise UserError("empty; give a model directory (or a hub id)", field=field)
    path = Path(spec)
    if path.exists():
        if not path.is_dir():   # e.g. its config.json or pytorch_model.bin: the directory is what is loaded
            raise UserError(f"a file, not a model directory; give the directory that holds it ({path.parent})",
                            path=path, field=field)
        return path
    text = str(spec)
    if not looks_like_hub_id(text):
        raise UserError("model path not found", path=path, field=field)
    if _offline():
        raise UserError(f"{text!r} is not a local directory; as a Hugging Face hub id it would be downloaded, but "
                        f"this machine is offline (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set): "
                        f"{download_advice(text)}", field=field)
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(text, allow_patterns=HUB_FILES)
    except Exception as e:  # noqa: BLE001 - no network, no such repo, gated repo: one answer
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UserError(f"{text!r} is not a local directory, and downloading it from the Hugging Face hub failed "
                        f"({type(e).__name__}: {first}); {download_advice(text)}", field=field) from e
    log.info("downloaded %s to %s", text, local)
    return Path(local)


# ------------------------------------------------------------------------------------------ pickled weights

def torch_load_tensors(path: Path) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU: tensors and plain containers only, never arbitrary
    objects. Exceptions are the caller's to word."""
    import torch

    with warnings.catch_warnings():
        # a foreign or damaged file may use another pickle protocol than torch.save's 2: either it loads anyway
        # or it is refused, so torch's warning about the protocol would only be noise before that message
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)


def read_pickled_weights(path: Path) -> dict[str, Any]:
    """The state dict in a `pytorch_model.bin`, read with `torch.load(weights_only=True)`: tensors and plain
    containers only; anything else in the pickle (a class, a function to call) is refused before it runs."""
    import torch

    try:
        data = torch_load_tensors(path)
    except pickle.UnpicklingError as e:
        why = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), "")
        raise UserError("refused: this pickle asks for more than tensors (it could run code when loaded), so it "
                        f"was not loaded{f' ({why[:200]})' if why else ''}; use a model.safetensors of this model, "
                        "or convert the file with a tool you trust", path=path) from e
    except Exception as e:  # noqa: BLE001 - torch raises KeyError, RuntimeError, EOFError ... for damaged files
        raise UserError(f"unreadable weights ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                        "expected a PyTorch state dict saved with torch.save", path=path) from e
    if not isinstance(data, dict) or not data:
        raise UserError(f"expected a state dict (tensor name -> tensor), found {type(data).__name__}", path=path)
    bad = [k for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"expected a state dict of tensors; {bad[0]!r} is a {type(data[bad[0]]).__name__} "
                        "(a training checkpoint with optimizer state? save the model's state_dict alone)",
                        path=path)
    return data


def check_state_dict(state: dict[str, Any], model, path: Path, declared_dtype: Any = None) -> dict[str, Any]:
    """The tensors `model` (built from config.json) takes, after checking names, shapes and dtypes; refuses
    missing, extra and misshapen tensors naming the first, so a vocabulary or width that is not config.json's
    never loads. Old causal-mask buffers are dropped; a tied LM head may be absent."""
    import torch

    expected = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.endswith(OLD_BUFFERS) and k not in expected)}
    tied = getattr(model.config, "tie_word_embeddings", True)
    head = "lm_head.weight"
    missing = sorted(k for k in expected if k not in state and not (tied and k == head))
    extra = sorted(k for k in state if k not in expected)
    if missing or extra:
        what = (f"{len(missing)} tensors config.json needs are missing (first: {missing[0]})" if missing
                else f"{len(extra)} tensors are not in a {model.config.model_type} model of this config.json "
                     f"(first: {extra[0]})")
        wrapped = extra and all(k.startswith("module.") for k in extra)   # torch.nn.DataParallel's names
        raise UserError(f"the weights do not match config.json: {what}"
                        + ("; the names start with 'module.' (saved from a DataParallel wrapper): save "
                           "model.module.state_dict() instead" if wrapped else ""), path=path)
    for name, tensor in state.items():
        want = expected[name]
        if tensor.layout != torch.strided:   # sparse: torch's loading would fail deep inside, unworded
            raise UserError(f"tensor {name} is a {str(tensor.layout).replace('torch.', '')} tensor; expected a dense "
                            "one (save tensor.to_dense())", path=path)
        if tuple(tensor.shape) != tuple(want.shape):
            raise UserError(f"tensor {name} is {list(tensor.shape)} in the file but config.json makes it "
                            f"{list(want.shape)} (vocab_size {model.config.vocab_size}, n_embd "
                            f"{getattr(model.config, 'n_embd', '?')}, n_positions "
                            f"{getattr(model.config, 'n_positions', '?')})", path=path)
        if want.is_floating_point() and not tensor.is_floating_point():
            raise UserError(f"tensor {name} is {tensor.dtype}, not floating point", path=path)
    embeddings = model.get_input_embeddings().weight
    wte = state.get(next((n for n, p in model.named_parameters() if p is embeddings), ""))
    if tied and head in state and wte is not None and not torch.equal(state[head], wte):
        raise UserError("config.json ties the LM head to the embeddings (tie_word_embeddings) but the file's "
                        "lm_head.weight differs from them; set tie_word_embeddings false in config.json if the "
                        "model really has its own head", path=path)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in state.values() if t.is_floating_point()})
    declared = str(declared_dtype).replace("torch.", "") if declared_dtype else None
    if declared and dtypes and dtypes != [declared]:
        log.warning("%s: config.json says %s but the weights are %s; loading them as %s", path, declared,
                    "/".join(dtypes), "float32 on CPU")
    return state


def safetensors_dtypes(files: list[Path]) -> dict[str, str]:
    """Each tensor's dtype as the safetensors headers name it ("F32", "BF16", "I64" ...), read without the data."""
    from safetensors import safe_open

    dtypes: dict[str, str] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                dtypes[name] = st.get_slice(name).get_dtype()
    return dtypes


def weights_dtype(model_dir: Path):
    """The floating dtype most of a model directory's weights are stored in (safetensors or pickled)."""
    from collections import Counter

    import torch

    counts: Counter = Counter()
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        counts.update(safetensors_dtypes(files).values())
        names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
        counts = Counter({names[k]: n for k, n in counts.items() if k in names})
    elif (model_dir / PICKLED_WEIGHTS).is_file():
        counts.update(t.dtype for t in read_pickled_weights(model_dir / PICKLED_WEIGHTS).values()
                      if t.is_floating_point())
    return counts.most_common(1)[0][0] if counts else None


def read_config(model_dir: Path):
    """config.json as a transformers config. Token ids outside the vocabulary are dropped: GPT2-chitchat's config
    keeps GPT-2's 50256 as bos/eos beside its 13,317-token vocabulary (our layouts place [CLS]/[SEP] themselves)."""
    import json

    from transformers import AutoConfig

    path = model_dir / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
            raise ValueError("expected a JSON object with a model_type")
        _check_config_fields(raw, path)
        if "torch_dtype" in raw:   # the name transformers < 4.56 wrote; the new one is "dtype"
            raw.setdefault("dtype", raw.pop("torch_dtype"))
        vocab = raw.get("vocab_size")
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(vocab, int) and isinstance(raw.get(key), int) and not 0 <= raw[key] < vocab:
                raw[key] = None
            elif key not in raw:  # else GPT2Config's default, GPT-2's 50256 again
                raw[key] = None
        return AutoConfig.for_model(raw.pop("model_type"), **raw)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - bad JSON, unknown model_type, bad values
        raise UserError(f"cannot read config.json: {type(e).__name__}: {e}", path=path) from e


# GPT-2's sizes: transformers takes 0 or a negative size and fails later, in a tensor shape or an index
_GPT2_SIZES = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")


def _check_config_fields(raw: dict, path: Path) -> None:
    """The config.json fields whose bad values transformers reports without their name (or not at all)."""
    import torch
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = raw["model_type"]
    if model_type not in CONFIG_MAPPING:   # transformers' own message lists every model type it knows
        raise UserError(f"unknown model_type {model_type!r} (a GPT-2 checkpoint says \"gpt2\")", path=path,
                        field="model_type")
    for key in ("torch_dtype", "dtype"):
        value = raw.get(key)
        if value is not None and value != "auto" and not (
                isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype)):
            raise UserError(f"{value!r} is not a torch dtype (float32, float16, bfloat16 ...)", path=path, field=key)
    if model_type == "gpt2":
        for key in _GPT2_SIZES:
            value = raw.get(key)
            if key in raw and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UserError(f"must be a positive integer, got {value!r}", path=path, field=key)


def load_pickled_model(model_dir: Path, dtype=None):
    """A causal LM built from config.json with the (checked) weights of its pytorch_model.bin.

    The model is built on the meta device and takes the file's tensors as they are (no random init first,
    which is most of the load time of a 12 x 768 model); every tensor must then be a real one."""
    import torch
    from transformers import AutoModelForCausalLM

    path = model_dir / PICKLED_WEIGHTS
    config = read_config(model_dir)
    state = read_pickled_weights(path)
    dtype = dtype or torch.float32
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - a config transformers cannot build
        raise UserError(f"cannot build a causal LM from config.json: {type(e).__name__}: {e}",
                        path=model_dir / "config.json") from e
    state = check_state_dict(state, model, path, getattr(config, "dtype", None))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    # strict in effect: check_state_dict refused any difference (a tied head may be absent)
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", True):
        model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise UserError(f"the weights leave {len(left)} tensors of this model unset (first: {left[0]})", path=path)
    return model
