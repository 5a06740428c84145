"""Loading models and tokenizers, choosing precision, and freezing the bottom of a decoder stack."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.config import LoraSpec, ModelSpec

if TYPE_CHECKING:
    import torch


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cuda_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def torch_dtype(spec: ModelSpec) -> "torch.dtype":
    import torch

    if spec.dtype == "auto":
        return torch.bfloat16 if cuda_bf16() else torch.float32
    return getattr(torch, spec.dtype)


def precision_flags(precision: str, spec: ModelSpec | None = None) -> dict[str, bool]:
    """`bf16`/`fp16` flags for a recipe's precision. auto = the half type the model is loaded in, else bf16
    on a CUDA device that supports it, else float32 (a half-precision model cannot train without autocast:
    its float32 trainable parts would meet its half frozen ones)."""
    if precision == "auto":
        dtype = spec.dtype if spec is not None else "auto"
        if dtype == "float16":
            precision = "fp16"
        elif dtype == "bfloat16" or cuda_bf16():
            precision = "bf16"
        else:
            precision = "fp32"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def load_tokenizer(spec: ModelSpec) -> Any:
    return folder_tokenizer(spec.path, spec.trust_remote_code)


def folder_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer, with a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        # A distinct pad keeps the reward head's "last real token" well defined; eos is the fallback.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def inference_model(path: str, device: Any, dtype: "torch.dtype | str | None" = None, reward: bool = False) -> Any:
    """A saved causal LM (or, with `reward`, a scalar-head reward model) frozen for inference on `device`,
    with fused BLOOM kernels; `dtype` None: bf16 where CUDA supports it, else float32 ("auto": as saved)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from engine.bloom_kernels import use_fused_kernels

    if dtype is None:
        dtype = torch.bfloat16 if cuda_bf16() else torch.float32
    cls = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    as_saved = dtype == "auto" and _safetensors_folder(path)
    if as_saved:
        # Each tensor as stored: from_pretrained casts all of them to one dtype, so the model loads in the
        # half type its frozen trunk is stored in (an export's config names float32 where it holds float32
        # trained parts: loaded so, a 7B reward model took twice the memory) and its float32 parts come
        # back below as they were stored.
        stored = stored_dtypes(path)
        dtype = stored_half(stored) or "auto"
    model = cls.from_pretrained(path, dtype=dtype)
    if as_saved:
        params = dict(model.named_parameters())
        load_exact(model, path, [name for name in stored_float32(path, stored)
                                 if name in params and params[name].dtype != torch.float32], as_stored=True)
    model = model.to(device).eval()
    model.requires_grad_(False)
    use_fused_kernels(model)
    return model


def load_causal_lm(spec: ModelSpec) -> Any:
    from transformers import AutoModelForCausalLM

    from engine.bloom_kernels import use_fused_kernels

    model = AutoModelForCausalLM.from_pretrained(
        spec.path, dtype=torch_dtype(spec), trust_remote_code=spec.trust_remote_code
    )
    use_fused_kernels(model)
    return _named_absolutely(model, spec.path)


def _named_absolutely(model: Any, path: str) -> Any:
    """The model named by its folder's absolute path where it is local: a LoRA checkpoint's adapter_config.json
    records that name as its base model, and a relative one (`demo/model`) loads from no other directory."""
    local = Path(path).expanduser()
    if local.is_dir():
        model.name_or_path = model.config.name_or_path = str(local.resolve())
    return model


def load_reward_trunk(spec: ModelSpec, pad_token_id: int) -> Any:
    """A causal-LM trunk with a fresh scalar head (`num_labels=1`), read at the last non-pad token."""
    from transformers import AutoModelForSequenceClassification

    from engine.bloom_kernels import use_fused_kernels

    model = AutoModelForSequenceClassification.from_pretrained(
        spec.path,
        num_labels=1,
        pad_token_id=pad_token_id,
        dtype=torch_dtype(spec),
        trust_remote_code=spec.trust_remote_code,
    )
    use_fused_kernels(model)
    return _named_absolutely(model, spec.path)


def _safetensors_folder(path: str) -> bool:
    """A local folder of safetensors weights (what every stage saves; a hub id or .bin weights load as
    from_pretrained gives them)."""
    from pathlib import Path

    folder = Path(path).expanduser()
    return (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()


def _weight_map(folder: Any) -> dict[str, str]:
    """Tensor name -> the safetensors file of a saved folder that holds it (one file: an empty map)."""
    import json
    from pathlib import Path

    index = Path(folder) / "model.safetensors.index.json"
    return json.loads(index.read_text())["weight_map"] if index.is_file() else {}


def stored_dtypes(folder: Any) -> dict[str, str]:
    """Each tensor of a saved folder and the type its safetensors store it in ("BF16", "F32", ...), read from
    the files' headers alone."""
    from safetensors import safe_open

    folder = Path(folder)
    found: dict[str, str] = {}
    for file in sorted(set(_weight_map(folder).values()) or {"model.safetensors"}):
        with safe_open(str(folder / file), framework="pt") as saved:
            found.update({name: saved.get_slice(name).get_dtype() for name in saved.keys()})
    return found


def stored_float32(folder: Any, stored: dict[str, str] | None = None) -> list[str]:
    """The tensors a saved folder stores in float32 (`stored`: its stored_dtypes, where read already)."""
    return [name for name, kind in (stored if stored is not None else stored_dtypes(folder)).items() if kind == "F32"]


def stored_half(stored: dict[str, str]) -> "torch.dtype | None":
    """The half-precision type a folder's tensors (its stored_dtypes) are stored in, bf16 before fp16."""
    import torch

    kinds = set(stored.values())
    return torch.bfloat16 if "BF16" in kinds else torch.float16 if "F16" in kinds else None


def config_names_float32(folder: Any) -> None:
    """A saved folder whose weights are partly float32 (trained parts over a bf16 frozen trunk): its
    config.json names float32, so that a plain `from_pretrained(folder)` gives the trained weights; naming
    bf16, it rounded them all (an update is small next to a bf16 step). Serving in bf16 stays a choice."""
    import json
    from pathlib import Path

    config = Path(folder) / "config.json"
    data = json.loads(config.read_text(encoding="utf-8"))
    # Not a safetensors folder (a DeepSpeed save without gathered weights): nothing here to read
    if data.get("dtype") in (None, "float32") or not _safetensors_folder(folder) or not stored_float32(folder):
        return
    data["dtype"] = "float32"
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_exact(model: "torch.nn.Module", folder: Any, names: list[str], as_stored: bool = False) -> None:
    """Copy the named parameters from a saved folder's safetensors as they were stored (`as_stored`: in
    their stored dtype too, else in the parameter's).

    `from_pretrained` casts every tensor to one dtype; a model saved with float32 trainable parts over a
    bf16 frozen trunk must get those parts back bit for bit, or a resumed run departs from the original.
    """
    from pathlib import Path

    from safetensors import safe_open

    folder = Path(folder)
    where = _weight_map(folder)
    params = dict(model.named_parameters())
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(where.get(name, "model.safetensors"), []).append(name)
    for file, wanted in by_file.items():
        with safe_open(str(folder / file), framework="pt") as saved:
            stored = set(saved.keys())
            for name in wanted:
                if name not in stored:
                    raise KeyError(f"{folder / file}: no tensor {name}")
                param = params[name]
                param.data = saved.get_tensor(name).to(device=param.device,
                                                       dtype=None if as_stored else param.dtype)


def decoder_layers(model: "torch.nn.Module") -> "torch.nn.ModuleList":
    """The model's own stack of decoder layers (BLOOM `transformer.h`, Llama `model.layers`, …)."""
    import torch

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    count = config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"{type(model).__name__}: no list of {count} decoder layers found")


def freeze_bottom_layers(model: "torch.nn.Module", num_layers_unfrozen: int) -> None:
    """Train only the top `num_layers_unfrozen` decoder layers and everything above them.

    The embeddings and the bottom layers are frozen. Anything that is neither (final norm, LM head or
    reward head) stays trainable, except a head tied to the frozen embeddings, which freezes with them.
    -1 leaves the model as it is; 0 freezes every decoder layer.
    """
    if num_layers_unfrozen < 0:
        return
    layers = decoder_layers(model)
    if num_layers_unfrozen > len(layers):
        raise ValueError(f"num_layers_unfrozen={num_layers_unfrozen} but the model has {len(layers)} layers")
    frozen = list(layers)[: len(layers) - num_layers_unfrozen]
    for module in [model.get_input_embeddings(), *frozen]:
        for param in module.parameters():
            param.requires_grad_(False)
    # Position embeddings and embedding norms (BLOOM's word_embeddings_layernorm) sit below layer 0 too.
    first = layers[0]
    for name, module in model.named_modules():
        if module is first:
            break
        if any(tag in name.split(".")[-1] for tag in ("emb", "wpe", "wte")):
            for param in module.parameters():
                param.requires_grad_(False)


def keep_fp32_masters(model: "torch.nn.Module", sharding: str | None = None) -> None:
    """Trainable parameters in float32, so that AdamW's small updates are not rounded away.

    A bf16 weight of magnitude 0.02 moves in steps of 2^-14 ≈ 6e-5: an update of lr 1e-5 does not move it
    at all. The math still runs in bf16 under the Trainer's autocast; frozen weights keep their load dtype
    (they never receive an update, so bf16 costs them nothing). `sharding`: "deepspeed" keeps its own
    float32 masters in the optimizer (nothing to do); "fsdp" shards flat parameters of one dtype, so the
    whole model goes to float32 (sharded, the cost is spread over the ranks) and FSDP's mixed precision
    casts for compute.
    """
    import torch

    if sharding == "deepspeed":
        return
    if sharding == "fsdp":
        model.float()
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def sharding_of(args: Any) -> str | None:
    """"deepspeed", "fsdp" or None: what holds the master weights of a TrainingArguments run (set by the
    arguments themselves or by `accelerate launch` through its environment)."""
    import os

    def on(name: str) -> bool:
        return os.environ.get(name, "").lower() in ("1", "true", "yes")

    if getattr(args, "deepspeed_plugin", None) is not None or on("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if getattr(args, "fsdp", None) or on("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return None


def lora_config(spec: LoraSpec) -> Any:
    """A peft LoraConfig for a causal LM from the recipe's `lora` section."""
    from peft import LoraConfig

    return LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=spec.target_modules,
        task_type="CAUSAL_LM",
    )
