"""Memory per GPU of each stage of a recipe, before launch, from the model's config alone.

No torch and no weights: the shape comes from a `config.json` (a local folder, the Hugging Face cache, or a
small built-in table of the recipe's own models), and every figure is a count of what the project's own
code keeps on the device, item by item. The model follows the code as it is:

- SFT / RM (trl's trainers): trainable weights are float32 masters (engine/models.py keep_fp32_masters),
  frozen ones keep the load dtype; AdamW keeps two float32 moments per trainable weight; activations are
  what the trainable layers save for backward at the recipe's batch and length (only the layer inputs with
  gradient checkpointing); SFT's LM head is trl's fused head (tiles of 4,096 tokens x 32,768 vocab, never
  the whole logits); the reward model's head is a scalar. DeepSpeed keeps bf16 weights and its own float32
  masters in the optimizer (ZeRO-1 shards the optimizer, ZeRO-2 also the gradients, ZeRO-3 the weights);
  FSDP makes the whole model float32 and shards it.
- PPO (engine/ppo): the hydra's frozen trunk, trainable float32 policy top and value branch, frozen
  reference top, the reward model; rollouts decode `chunk_size` prompts at a time with a KV cache of
  (prompt + max_new_tokens) tokens; scoring and updates run in minibatches with float32 logits over the
  vocabulary for the response positions (engine/head.py); the trunk's output is cached for the updates,
  kept by the BLOOM decoder as it samples where that costs no decode batch, else by the scoring forward.

A stage's memory changes over a step, so each item is alive during some moments (decoding, scoring, the
update's forward, ...); the peak is the largest moment's total. Figures are what torch's allocator holds
(`torch.cuda.max_memory_allocated`); the verdict adds the CUDA context and allocator slack.

Checked against the real objects' byte counts on CPU (tests/test_estimate.py) and against peaks measured on
an H200: benchmarks/ppo_bench.py, benchmarks/ppo_iteration.py and `rlhf train sft`, within 3 %.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from engine.config import STAGE_REFS, STAGES, LoraSpec, Recipe, RecipeError, looks_local

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DEFAULT_GPU_MEMORY = 80 * GIB
CONTEXT_BYTES = 1 * GIB  # the CUDA context and its kernels: on the GPU, outside torch's allocator
SLACK = 0.05  # allocator fragmentation over the allocated peak
FUSED_TOKENS, FUSED_VOCAB = 4096, 32768  # trl's fused LM head tile (trl.kernels.chunked_logprob)
SPLIT_MIN_OUTPUTS = 4096  # engine/head.py: smaller heads are plain float32 products
REWARD_BATCH = 16  # engine/ppo/rewards.py RewardModelScorer's batch


class EstimateError(RecipeError):
    """An estimate that cannot be made; the message names the field or file."""


# -- model shapes -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """What memory depends on in a decoder-only model. `arch` is "bloom" or "llama" (any Llama-style
    config: separate q/k/v projections, gated MLP, RMSNorm; activations there are approximate)."""

    name: str
    arch: str
    hidden: int
    layers: int
    heads: int
    vocab: int
    kv_heads: int = 0
    head_dim: int = 0
    intermediate: int = 0
    tied: bool = True
    qkv_bias: bool = False
    mlp_bias: bool = False
    dtype: str | None = None  # the dtype the config says the weights were saved in
    source: str = ""
    # BLOOM's attention through SDPA and its GELU as one kernel (engine/bloom_kernels.py, what the engine loads);
    # False: transformers' eager attention (the H200 measurements made before those kernels).
    fused: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "kv_heads", self.kv_heads or self.heads)
        object.__setattr__(self, "head_dim", self.head_dim or self.hidden // self.heads)
        object.__setattr__(self, "intermediate", self.intermediate or 4 * self.hidden)

    # Parameter counts, per piece.
    @property
    def embedding(self) -> int:
        """Input embeddings (BLOOM also normalises them: word_embeddings_layernorm)."""
        return self.vocab * self.hidden + (2 * self.hidden if self.arch == "bloom" else 0)

    @property
    def head(self) -> int:
        """The LM head's matrix (the embedding matrix itself when tied)."""
        return self.vocab * self.hidden

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear module of a decoder layer, by the name peft's target_modules use."""
        h = self.hidden
        if self.arch == "bloom":
            return {"query_key_value": (h, 3 * h), "dense": (h, h), "dense_h_to_4h": (h, 4 * h),
                    "dense_4h_to_h": (4 * h, h)}
        q, kv, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_linear(self) -> int:
        """Weights and biases of a layer's linear modules (what autocast casts to bf16)."""
        weights = sum(i * o for i, o in self.linears().values())
        if self.arch == "bloom":  # every BLOOM linear has a bias
            return weights + sum(o for _, o in self.linears().values())
        biases = 0
        if self.qkv_bias:
            biases += sum(self.linears()[n][1] for n in ("q_proj", "k_proj", "v_proj"))
        if self.mlp_bias:
            biases += sum(self.linears()[n][1] for n in ("gate_proj", "up_proj", "down_proj"))
        return weights + biases

    @property
    def norm(self) -> int:
        """One norm: LayerNorm (weight and bias) in BLOOM, RMSNorm (weight) otherwise."""
        return 2 * self.hidden if self.arch == "bloom" else self.hidden

    @property
    def layer(self) -> int:
        return self.layer_linear + 2 * self.norm

    def total(self, head: str = "lm") -> int:
        """All parameters: "lm" a causal LM (a tied head counted once), "score" a sequence classifier with
        a one-label head."""
        top = self.hidden if head == "score" else (0 if self.tied else self.head)
        return self.embedding + self.layers * self.layer + self.norm + top

    def lora_layer(self, r: int, targets: list[str] | str, field_name: str) -> int:
        """LoRA parameters in one decoder layer: r x (in + out) per targeted linear."""
        modules = self.linears()
        names = list(modules) if targets == "all-linear" else list(targets)
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise EstimateError(f"{field_name}: {', '.join(unknown)} is not a linear module of a {self.arch} layer "
                                f"(those are: {', '.join(modules)})", {field_name: "unknown module"})
        return sum(r * sum(modules[n]) for n in names)

    def lora_inputs(self, targets: list[str] | str) -> int:
        """Sum of the targeted linears' input widths (each adapter keeps its dropped-out input)."""
        modules = self.linears()
        names = list(modules) if targets == "all-linear" else [n for n in targets if n in modules]
        return sum(modules[n][0] for n in names)

    # Activations, per decoder layer.
    def saved_per_token(self, mode: str) -> int:
        """Bytes a layer that needs gradients saves for backward, per token (attention's T x T apart).

        BLOOM under bf16 autocast with a float32 residual stream: LN1 input (4h), the bf16 copy of its
        output that the QKV linear saves (2h), q/k/v made contiguous (6h), the merged context (2h), LN2
        input (4h), the bf16 MLP input (2h), GELU's input (8h) and the 4h->h linear's input (8h) = 36h.
        Without autocast: bf16 throughout (32h), float32 throughout (64h). Plus LayerNorm statistics."""
        h = self.hidden
        if self.arch == "bloom":
            eager = {"autocast": 36 * h, "half": 32 * h, "fp32": 64 * h}[mode] + 16
            # SDPA keeps q/k/v as views of the fused QKV output (the bytes of eager's three copies) and its
            # output (the dense layer's input, as eager's merged context), plus a float32 log-sum-exp per head.
            return eager + (4 * self.heads if self.fused else 0)
        c = 4 if mode == "fp32" else 2
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        # Approximate: two RMSNorms in float32 (8h each), the linears' inputs, SDPA's q/k/v/output, the
        # gated MLP's four I-wide tensors.
        return 16 * h + c * (2 * h + 3 * q + 2 * kv + 4 * self.intermediate)

    def saved_per_sequence(self, mode: str, length: int) -> int:
        """Attention's saved [heads, T, T] tensors per layer and sequence: eager BLOOM's softmax output
        (float32) and its copy in the compute dtype that the weighted sum saves; Llama-style SDPA and fused
        BLOOM save none of their own (see shared_per_sequence)."""
        if self.arch != "bloom" or self.fused:
            return 0
        per = 4 if mode == "fp32" else 6
        return per * self.heads * length * length

    def shared_per_sequence(self, mode: str, length: int) -> int:
        """What all layers of one forward save together, per sequence: fused BLOOM's additive bias (ALiBi +
        mask, compute dtype, [heads, T, T]), made once and kept by every layer's SDPA for its backward."""
        if self.arch != "bloom" or not self.fused:
            return 0
        return (4 if mode == "fp32" else 2) * self.heads * length * length

    def residual_per_token(self, mode: str) -> int:
        """What a checkpointed layer keeps: its input hidden state."""
        if self.arch == "bloom":
            return (2 if mode == "half" else 4) * self.hidden
        return (4 if mode == "fp32" else 2) * self.hidden

    def working_set(self, mode: str, sequences: int, length: int) -> int:
        """One decoder layer's tensors while it runs (no gradients kept): its intermediate outputs, and
        BLOOM's [heads, T, T] attention bias (fused; counted as over float32 weights under autocast, 4 bytes
        more than over bf16 ones) or eager attention's scores, masked scores, float32 softmax and
        probabilities."""
        c = 4 if mode == "fp32" else 2
        tokens = sequences * length
        if self.arch == "bloom":
            if self.fused:  # the bias, in the mask's dtype (float32 under autocast over float32 weights) and cast
                attention = {"autocast": 6, "half": 2, "fp32": 4}[mode] * self.heads * length * length
            else:
                attention = (12 if mode == "fp32" else 10) * self.heads * length * length
            return tokens * (17 * self.hidden * c + 12 * self.hidden) + sequences * attention
        return tokens * (c * (3 * self.hidden + 2 * self.intermediate) + 8 * self.hidden)

    def kv_per_token(self, compute_bytes: int) -> int:
        """Keys and values of every layer for one token."""
        return self.layers * 2 * self.kv_heads * self.head_dim * compute_bytes


# Of the memory free when a rollout starts decoding (the decoder's own copies of the weights already built),
# the share its batches are sized to fill: the KV cache is a few huge blocks, and part of what the caching
# allocator holds free is fragments. Measured on an H200 at 7b1 shape (benchmarks/results_h200.md): 80 % ran out
# of memory when the prefill ran over the whole batch at once, under-counted, and the free memory was read
# before the decoder's ~4.1 GB were built; decode batches of 256 with that whole-batch prefill peaked at
# 132.41 GiB of 139.8. The prefill now runs in slices of PREFILL_TOKENS (a fixed cost, not a per-row one), and
# 80 % of the memory left after the decoder there is 256 rows (~80-83 GiB: my back-calculation from the 208
# rows the 70 % rule took, not a printed figure).
DECODE_FREE_SHARE = 0.8
# Prompt tokens the BLOOM decoder prefills at once: 32 prompts of 256 tokens, wide enough that its products
# run at full speed, and ~1.4 GB of working tensors at 7b1 shape instead of ~11 GB for 256 prompts.
PREFILL_TOKENS = 8192
# Answer positions of the kept trunk the BLOOM decoder holds on the GPU before it copies them out to host
# memory (engine/bloom_decoder.py Batch, as RING): 1 MiB a row at 7b1 shape, instead of 8 MiB for 512 positions.
TRUNK_RING = 64


def prefill_rows(rows: int, prompt: int) -> int:
    """How many of a decode batch's `rows` prompts of `prompt` tokens the BLOOM decoder prefills at once."""
    return max(1, min(rows, PREFILL_TOKENS // max(1, prompt)))


def decode_rows(budget: int, fixed: int, per_row: int, limit: int) -> int:
    """The decode batch for `limit` prompts that `budget` bytes hold, beside `fixed` bytes that do not grow
    with it, at `per_row` bytes a prompt: a multiple of 8 from 16 rows on, and batches of even width."""
    rows = (budget - fixed) // per_row if per_row > 0 else limit
    rows = max(1, min(limit, rows // 8 * 8 if rows >= 16 else rows))
    # Batches of even width: every batch decodes the whole answer length and reads all the weights at each
    # step, so 256 prompts as 208 + 48 took longer than 128 + 128 (H200, 7b1 shape: 47.0 s against 43.7 s
    # per 1,024 prompts).
    batches = -(-limit // rows)
    even = -(-limit // batches)
    return min(rows, -(-even // 8) * 8) if even >= 16 else even


def trunk_costs_a_batch(plain_rows: int, keeping_rows: int, limit: int) -> bool:
    """Whether keeping the trunk while decoding (the decoder's ring: 1 MiB a row at 7b1 shape) would split
    `limit` prompts into more decode batches than without it. Then it does not pay: every batch reads all the
    weights at each of its steps (on an H200, 256 prompts as 208 + 48 rows took the generate phase to 47.0 s
    per 1,024 prompts, against 33.5 s as one batch of 256: about what the kept trunk should save the scoring
    forward), and the scoring forward computes the trunk instead."""
    return -(-limit // keeping_rows) > -(-limit // plain_rows)


def bloom_prefill_bytes(rows: int, prompt: int, hidden: int, heads: int, compute_bytes: int) -> int:
    """The BLOOM decoder's prefill runs a layer over `rows` prompts' tokens at once beside the cache: the
    float32 residual stream, the MLP's 4h-wide output and GELU's temporaries, and the attention bias [rows,
    heads, P, P] (ALiBi + mask, compute dtype) with its float32 mask [rows, 1, P, P]. (engine.generation
    sizes its decode batches with this too.)"""
    return rows * prompt * (8 + 15 * compute_bytes) * hidden + rows * (compute_bytes * heads + 4) * prompt * prompt


# The recipe's own models, for a laptop without them or a network: public config.json values.
KNOWN_SHAPES: dict[str, dict[str, Any]] = {
    "bigscience/bloomz-7b1-mt": {"hidden": 4096, "layers": 30, "heads": 32, "vocab": 250880},
    "bigscience/bloomz-7b1": {"hidden": 4096, "layers": 30, "heads": 32, "vocab": 250880},
    "bigscience/bloom-7b1": {"hidden": 4096, "layers": 30, "heads": 32, "vocab": 250880},
    "bigscience/bloom-560m": {"hidden": 1024, "layers": 24, "heads": 16, "vocab": 250880},
    "bigscience/bloomz-560m": {"hidden": 1024, "layers": 24, "heads": 16, "vocab": 250880},
}


def _first(config: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return None


def shape_from_config(config: dict[str, Any], name: str, source: str) -> Shape:
    """A Shape from a config.json's values (BLOOM's own key names or the usual ones)."""
    if isinstance(config.get("text_config"), dict):  # a multimodal wrapper: its language model
        config = {**config["text_config"], "model_type": config["text_config"].get("model_type")}
    kind = config.get("model_type")
    hidden = _first(config, "hidden_size", "n_embed", "n_embd", "d_model")
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(config, "num_attention_heads", "n_head")
    vocab = config.get("vocab_size")
    missing = [k for k, v in (("hidden_size", hidden), ("num_hidden_layers", layers),
                              ("num_attention_heads", heads), ("vocab_size", vocab)) if not isinstance(v, int)]
    if missing:
        raise EstimateError(f"{source}: no {', '.join(missing)} in the model's config")
    if kind == "bloom":
        arch = "bloom"
    elif config.get("intermediate_size"):
        arch = "llama"
    else:
        raise EstimateError(f"{source}: model_type {kind!r}: only BLOOM and Llama-style models (intermediate_size, "
                            "num_key_value_heads) can be estimated")
    return Shape(
        name=name, arch=arch, hidden=hidden, layers=layers, heads=heads, vocab=vocab,
        kv_heads=config.get("num_key_value_heads") or 0, head_dim=config.get("head_dim") or 0,
        intermediate=config.get("intermediate_size") or 0,
        tied=bool(config.get("tie_word_embeddings", arch == "bloom")),
        qkv_bias=bool(config.get("attention_bias", kind == "qwen2")), mlp_bias=bool(config.get("mlp_bias", False)),
        dtype=_first(config, "dtype", "torch_dtype"), source=source,
    )


def hub_cache_config(repo_id: str) -> Path | None:
    """config.json of a hub model in the local Hugging Face cache, found by path alone (no huggingface_hub
    import: the console calls this)."""
    if os.environ.get("HF_HUB_CACHE"):
        root = Path(os.environ["HF_HUB_CACHE"])
    elif os.environ.get("HF_HOME"):
        root = Path(os.environ["HF_HOME"]) / "hub"
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface" / "hub"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    try:
        if ref.is_file():
            candidate = repo / "snapshots" / ref.read_text().strip() / "config.json"
            if candidate.is_file():
                return candidate
        found = sorted(repo.glob("snapshots/*/config.json"), key=lambda p: p.stat().st_mtime)
    except OSError:
        return None
    return found[-1] if found else None


def load_shape(path: str, field_name: str) -> Shape:
    """The shape of the model at `path` (a local folder, or a hub id: its cached config, else the
    built-in table). Raises EstimateError naming `field_name`."""
    local = Path(path).expanduser()
    if local.is_dir():
        config_file = local / "config.json"
        if not config_file.is_file():
            raise EstimateError(f"{field_name}: {path!r} holds no config.json", {field_name: "no config.json"})
        source = str(config_file)
    else:
        if looks_local(path):
            raise EstimateError(f"{field_name}: {path!r} does not exist", {field_name: "does not exist"})
        cached = hub_cache_config(path)
        if cached is None:
            if path in KNOWN_SHAPES:
                return Shape(name=path, arch="bloom", source="built-in table", **KNOWN_SHAPES[path])
            raise EstimateError(
                f"{field_name}: {path!r} is not a local model folder, not in the Hugging Face cache and not in the "
                f"built-in table ({', '.join(sorted(KNOWN_SHAPES))}): give a folder with its config.json",
                {field_name: "no config.json to estimate from"})
        config_file, source = cached, f"Hugging Face cache ({cached})"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise EstimateError(f"{field_name}: {config_file}: cannot read the config ({err})",
                            {field_name: "unreadable config.json"}) from None
    if not isinstance(config, dict):
        raise EstimateError(f"{field_name}: {config_file}: not a JSON object", {field_name: "bad config.json"})
    return shape_from_config(config, path, source)


# -- how the stages are spread over GPUs ---------------------------------------------------------------------

@dataclass(frozen=True)
class Parallel:
    """`kind`: "single", "ddp", "zero" (DeepSpeed) or "fsdp"; `gpus`: processes sharing the work."""

    kind: str = "single"
    gpus: int = 1
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    reshard: bool = True  # FSDP: parameters re-sharded after each unit's forward (full shard)
    cpu: bool = False  # a CPU config (use_cpu): float32, per process, no GPU verdict
    source: str = "one GPU"

    def describe(self) -> str:
        if self.cpu:
            return f"CPU, {_plural(self.gpus, 'process')}"
        if self.kind == "zero":
            text = f"DeepSpeed ZeRO-{self.zero_stage} over {self.gpus} GPU{'s' * (self.gpus > 1)}"
            if self.offload_optimizer:
                text += ", optimizer offloaded"
            if self.offload_params:
                text += ", parameters offloaded"
            return text
        if self.kind == "fsdp":
            return f"FSDP ({'full shard' if self.reshard else 'shard grads and optimizer'}) over {self.gpus} GPUs"
        if self.gpus > 1:
            return f"data parallel (DDP) over {self.gpus} GPUs"
        return "one GPU"

    @property
    def shards(self) -> int:
        return max(self.gpus, 1)


def parallel_from_config(path: str | None, gpus: int | None) -> Parallel:
    """Sharding from an accelerate config file (as `rlhf launch --accelerate-config` takes); `gpus`
    overrides its num_processes."""
    if gpus is not None and gpus < 1:
        raise EstimateError(f"--gpus {gpus}: at least 1")
    if path is None:
        n = gpus or 1
        return Parallel("ddp" if n > 1 else "single", n)
    from engine.accelerate_file import read_accelerate_config as read_file

    try:
        data = read_file(path)
    except RecipeError as err:
        raise EstimateError(str(err)) from None
    kind = str(data["distributed_type"]).upper()
    processes = data.get("num_processes", 1)
    if not isinstance(processes, int) or processes < 1:
        raise EstimateError(f"{path}: num_processes: expected a positive integer, got {processes!r}")
    n = gpus or processes
    if kind == "MULTI_CPU" or data.get("use_cpu") is True:
        return Parallel("ddp" if n > 1 else "single", n, cpu=True, source=path)
    if kind in ("NO", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU"):
        return Parallel("ddp" if n > 1 else "single", n, source=path)
    if kind == "DEEPSPEED":
        ds = data.get("deepspeed_config") or {}
        stage = ds.get("zero_stage")
        offload_opt, offload_par = ds.get("offload_optimizer_device"), ds.get("offload_param_device")
        if ds.get("deepspeed_config_file"):  # a DeepSpeed JSON of its own
            json_path = Path(ds["deepspeed_config_file"])
            try:
                zero = json.loads(json_path.read_text(encoding="utf-8")).get("zero_optimization") or {}
            except (OSError, ValueError) as err:
                raise EstimateError(f"{path}: deepspeed_config_file {json_path}: cannot read it ({err})") from None
            stage = zero.get("stage", stage)
            offload_opt = (zero.get("offload_optimizer") or {}).get("device", offload_opt)
            offload_par = (zero.get("offload_param") or {}).get("device", offload_par)
        if stage not in (0, 1, 2, 3):
            raise EstimateError(f"{path}: deepspeed_config.zero_stage: expected 0, 1, 2 or 3, got {stage!r}")
        return Parallel("zero", n, zero_stage=stage, offload_optimizer=offload_opt in ("cpu", "nvme"),
                        offload_params=offload_par in ("cpu", "nvme"), source=path)
    if kind == "FSDP":
        fsdp = data.get("fsdp_config") or {}
        strategy = str(fsdp.get("fsdp_sharding_strategy", "FULL_SHARD")).upper()
        if strategy in ("NO_SHARD", "3"):
            return Parallel("ddp" if n > 1 else "single", n, source=path)
        reshard = fsdp.get("fsdp_reshard_after_forward", strategy not in ("SHARD_GRAD_OP", "2"))
        if isinstance(reshard, str):  # FSDP1 configs name a strategy here
            reshard = reshard.upper() in ("TRUE", "FULL_SHARD", "HYBRID_SHARD")
        return Parallel("fsdp", n, reshard=bool(reshard), source=path)
    raise EstimateError(f"{path}: distributed_type: {kind!r} is not one that can be estimated "
                        "(NO, MULTI_GPU, DEEPSPEED, FSDP)")


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'80GiB', '80G' and a bare 80 are binary (GiB); '80GB' is decimal; '24000MiB' too."""
    match = _SIZE.match(text)
    if not match or not float(match[1]) > 0:
        raise EstimateError(f"--gpu-memory {text!r}: expected a size such as 80GiB or 141GB")
    number, unit, binary, byte = float(match[1]), match[2].lower(), match[3], match[4]
    if not unit:
        return int(number * GIB)
    power = "kmgt".index(unit) + 1
    return int(number * (1000 if byte and not binary else 1024) ** power)


# -- items and moments ---------------------------------------------------------------------------------------

ALWAYS = ("*",)


@dataclass(frozen=True)
class Item:
    """`key` is stable (tests and the console read it); `moments` the moments of a step it is on the
    device (ALWAYS: all of them)."""

    key: str
    name: str
    bytes: int
    moments: tuple[str, ...] = ALWAYS

    def alive(self, moment: str) -> bool:
        return self.moments == ALWAYS or moment in self.moments


@dataclass
class StageEstimate:
    stage: str
    title: str
    details: list[str]
    items: list[Item]
    moments: list[str]
    parallel: Parallel
    gpu_memory: int = DEFAULT_GPU_MEMORY
    notes: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)

    def total(self, moment: str) -> int:
        return sum(i.bytes for i in self.items if i.alive(moment))

    @property
    def peak_moment(self) -> str:
        return max(self.moments, key=self.total)

    @property
    def peak(self) -> int:
        return self.total(self.peak_moment)

    @property
    def needed(self) -> int:
        """The peak with the CUDA context and the allocator's slack."""
        return int(self.peak * (1 + SLACK)) + CONTEXT_BYTES

    @property
    def fits(self) -> bool:
        return self.parallel.cpu or self.needed <= self.gpu_memory

    @property
    def largest(self) -> Item:
        moment = self.peak_moment
        return max((i for i in self.items if i.alive(moment)), key=lambda i: i.bytes)

    def item(self, key: str) -> Item | None:
        return next((i for i in self.items if i.key == key), None)

    def phases(self) -> dict[str, int]:
        """Each phase's largest moment ("scoring: policy head" is a moment of phase "scoring")."""
        out: dict[str, int] = {}
        for moment in self.moments:
            phase = moment.split(":")[0]
            out[phase] = max(out.get(phase, 0), self.total(moment))
        return out

    def _when(self, item: Item) -> str:
        """The moments an item is on the GPU, by phase: "scoring", "update: log-probs/backward"."""
        if item.moments == ALWAYS or set(item.moments) >= set(self.moments):
            return "always"
        missing = [m for m in self.moments if m not in item.moments]
        if len(missing) == 1 and len(self.moments) > 3:
            return f"all but {missing[0]}"
        out = []
        for phase in dict.fromkeys(m.partition(": ")[0] for m in self.moments):
            every = [m for m in self.moments if m.partition(": ")[0] == phase]
            held = [m.partition(": ")[2] for m in every if m in item.moments]
            if held:
                out.append(phase if len(held) == len(every) else f"{phase}: {'/'.join(held)}")
        return "; ".join(out)

    def verdict(self) -> str:
        if self.parallel.cpu:
            return "on CPU: no GPU memory to fit"
        return "fits" if self.fits else "DOES NOT FIT"

    def summary(self) -> str:
        """One line: peak, verdict, largest item (the launch form shows it)."""
        largest = self.largest
        if self.parallel.cpu:
            where = f"peak {gib(self.peak)} per process on CPU"
        else:
            gpus = self.parallel.gpus
            where = (f"peak {gib(self.peak)} per GPU ({gpus} GPU{'s' * (gpus > 1)}), "
                     f"{'fits' if self.fits else 'does not fit'} in {gib(self.gpu_memory)}")
        return f"{self.stage}: {where}; largest: {largest.name} {gib(largest.bytes)}"

    def table(self) -> list[str]:
        peak = self.peak_moment
        width = max(len(i.name) for i in self.items) + 2
        per, when = ("per process", "when held") if self.parallel.cpu else ("per GPU", "when on the GPU")
        lines = [self.title]
        for detail in self.details:
            lines += textwrap.wrap(detail, 116, initial_indent="  ", subsequent_indent="    ")
        lines.append(f"  {'item':{width}} {per:>11}  {when}")
        for item in self.items:
            mark = "*" if item.alive(peak) else " "
            lines.append(f"{mark} {item.name:{width}} {gib(item.bytes):>11}  {self._when(item)}")
        lines.append("  peaks: " + " · ".join(f"{phase} {gib(total)}" for phase, total in self.phases().items()))
        lines.append(f"  peak {gib(self.peak)} at {peak} (the items marked *)")
        largest = self.largest
        if self.parallel.cpu:
            lines.append(f"  {self.verdict()}; largest item: {largest.name} ({gib(largest.bytes)})")
        else:
            lines.append(f"  with the CUDA context and {int(SLACK * 100)} % allocator slack {gib(self.needed)} of "
                         f"{gib(self.gpu_memory)}: {self.verdict()}")
            lines.append(f"  largest item: {largest.name} ({gib(largest.bytes)})")
        lines += ["  note: " + n for n in self.notes]
        if self.advice:
            lines.append("  to make it fit:")
            lines += ["    " + a for a in self.advice]
        return lines


def gib(n: float) -> str:
    if n >= GIB / 10:
        return f"{n / GIB:.2f} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def _plural(n: int, word: str) -> str:
    suffix = "es" if word.endswith(("s", "sh", "ch", "x")) else "s"  # processes, not processs
    return f"{n} {word}{suffix * (n != 1)}"


# -- SFT and reward model -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainSetup:
    """One SFT or RM micro-batch step through trl's trainer (torch's fused AdamW, HF Trainer's default)."""

    stage: str  # "sft" or "rm"
    shape: Shape
    load_bytes: int  # weights as loaded
    compute: str  # "bf16", "fp16" or "fp32"
    sequences: int  # per micro-batch and GPU (RM: chosen + rejected)
    length: int
    grad_accum: int = 1
    checkpointing: bool = False
    unfrozen: int = -1  # top layers trained; -1 = all
    lora: LoraSpec | None = None
    parallel: Parallel = Parallel()


def train_counts(s: TrainSetup) -> tuple[int, int, int, int]:
    """(trainable parameters, frozen parameters, trainable linear weights in recorded layers, recorded
    layers): recorded = layers whose activations are kept for backward (those at or above the lowest
    trainable one)."""
    shape = s.shape
    total = shape.total("score" if s.stage == "rm" else "lm")
    if s.lora is not None:
        where = f"{s.stage}.lora.target_modules"
        trainable = shape.layers * shape.lora_layer(s.lora.r, s.lora.target_modules, where)
        return trainable, total, 0, shape.layers
    if s.unfrozen < 0:
        return total, 0, shape.layers * shape.layer_linear, shape.layers
    if s.unfrozen > shape.layers:
        field_name = f"{s.stage}.num_layers_unfrozen"
        raise EstimateError(f"{field_name}: {s.unfrozen} but the model has {shape.layers} layers",
                            {field_name: "more than the model's layers"})
    top = s.unfrozen * shape.layer + shape.norm
    if s.stage == "rm":
        top += shape.hidden  # the score head
    elif not shape.tied:
        top += shape.head  # an untied LM head stays trainable (a tied one freezes with the embeddings)
    return top, total - top, s.unfrozen * shape.layer_linear, s.unfrozen


def train_estimate(s: TrainSetup, gpu_memory: int = DEFAULT_GPU_MEMORY) -> StageEstimate:
    shape, par = s.shape, s.parallel
    trainable, frozen, recorded_linear, recorded = train_counts(s)
    half = s.compute in ("bf16", "fp16")
    n = par.shards
    zero, fsdp = par.kind == "zero", par.kind == "fsdp"
    # Activation mode: DeepSpeed runs a half model without autocast; the others autocast over float32
    # masters (FSDP casts its float32 shards to the compute dtype the same way).
    mode = "fp32" if not half else ("half" if zero else "autocast")
    c = 2 if half else 4
    fwd, bwd, step = "forward/backward", "backward end", "optimizer step"
    items: list[Item] = []

    if zero:
        p = c  # DeepSpeed keeps the module in the compute dtype and its float32 masters in the optimizer
        shard_p = n if par.zero_stage >= 3 else 1
        if not par.offload_params:
            items.append(Item("params", f"parameters ({_dt(p)}{_sharded(shard_p)})",
                              (trainable + frozen) * p // shard_p))
        shard_g = n if par.zero_stage >= 2 else 1
        grads = trainable * p // shard_g
        if not par.offload_optimizer:
            shard_o = n if par.zero_stage >= 1 else 1
            items.append(Item("optimizer", f"optimizer: float32 masters + AdamW's 2 moments{_sharded(shard_o)}",
                              trainable * 12 // shard_o))
        grad_name = f"gradients ({_dt(p)}{_sharded(shard_g)})"
        step_temp = trainable * 4 // max(n if par.zero_stage >= 1 else 1, 1)  # a float32 gradient partition
    elif fsdp:
        # engine/models.py keep_fp32_masters: FSDP shards flat parameters of one dtype: all float32.
        items.append(Item("params", f"parameters (float32, whole model{_sharded(n)})", (trainable + frozen) * 4 // n))
        items.append(Item("optimizer", f"AdamW's 2 moments (float32{_sharded(n)})", trainable * 8 // n))
        grads, grad_name, step_temp = trainable * 4 // n, f"gradients (float32{_sharded(n)})", 0
    else:
        master = 4  # keep_fp32_masters (peft keeps LoRA adapters float32 by itself)
        items.append(Item("params_trainable", f"trainable parameters ({trainable:,}, float32 masters)",
                          trainable * master))
        if frozen:
            what = "base model" if s.lora is not None else "frozen parameters"
            items.append(Item("params_frozen", f"{what} ({frozen:,}, {_dt(s.load_bytes)})", frozen * s.load_bytes))
        items.append(Item("optimizer", "AdamW's 2 moments (float32)", trainable * 8))
        grads, grad_name, step_temp = trainable * 4, "gradients (float32)", 0
        if par.gpus > 1:  # torch DDP's buckets hold a copy of the gradients (gradient_as_bucket_view=False)
            items.append(Item("ddp_buckets", "DDP gradient buckets (float32)", grads))
    # Gradients exist through the forward only while micro-batches accumulate into them.
    items.append(Item("grads", grad_name, grads, (fwd, bwd, step) if s.grad_accum > 1 else (bwd, step)))

    tokens = s.sequences * s.length
    full = tokens * shape.saved_per_token(mode) + s.sequences * shape.saved_per_sequence(mode, s.length)
    if s.lora is not None:  # each adapter keeps its dropped-out input and the dropout mask
        full += tokens * shape.lora_inputs(s.lora.target_modules) * (c + 1)
    last = tokens * 4 * shape.hidden + s.sequences * shape.shared_per_sequence(mode, s.length)  # + final norm's input
    if s.checkpointing:
        saved = recorded * tokens * shape.residual_per_token(mode) + full + last
        what = f"activations: {recorded} checkpointed layer inputs + 1 layer recomputed"
    else:
        saved = recorded * full + last
        what = f"activations of {_plural(recorded, 'layer')}"
    items.append(Item("activations", f"{what} ({s.sequences} x {s.length} tokens)", saved, (fwd,)))
    if mode == "autocast" and not fsdp and recorded_linear:
        # Autocast's bf16 copies of float32 weights stay saved for backward (one layer at a time when
        # checkpointed).
        cast = (recorded_linear // recorded if s.checkpointing else recorded_linear) * 2
        items.append(Item("casts", "bf16 copies of the trainable weights (autocast)", cast, (fwd,)))
    if s.stage == "sft":
        rows = min(tokens, FUSED_TOKENS)
        head = rows * min(shape.vocab, FUSED_VOCAB) * c + min(shape.vocab, FUSED_VOCAB) * shape.hidden * c \
            + tokens * shape.hidden * (c + 4)  # the tile, a cast slice of the head, the kept and grad hidden
        items.append(Item("logits", f"logits: trl's fused head, tiles of {rows:,} tokens x "
                                    f"{min(shape.vocab, FUSED_VOCAB):,} vocab", head, (fwd,)))
        head_trainable = s.lora is None and (s.unfrozen < 0 or not shape.tied)
        if head_trainable:  # the fused head's backward accumulates the weight's gradient in float32 first
            items.append(Item("head_grad", "LM head weight gradient being accumulated (float32)",
                              shape.head * 4, (fwd,)))  # full size on every rank, before any reduction
    # The backward's last layers: every gradient made, one layer's activations (recomputed when checkpointed)
    # and, when the embeddings train, their float32 gradient made in full before it is added to the one the
    # tied LM head (or the previous micro-batch) left.
    cast_one = recorded_linear // recorded * 2 if mode == "autocast" and not fsdp and recorded_linear else 0
    items.append(Item("last_layer", "backward's last layer: its activations", full + cast_one
                      + s.sequences * shape.shared_per_sequence(mode, s.length), (bwd,)))
    if s.lora is None and s.unfrozen < 0 and (shape.tied or s.grad_accum > 1):
        items.append(Item("embedding_grad", "embedding gradient being accumulated",
                          shape.vocab * shape.hidden * (c if zero else 4), (bwd,)))
    if zero and par.zero_stage >= 3 or fsdp:
        units = shape.embedding + 2 * shape.layer
        gathered = (trainable + frozen) if fsdp and not par.reshard else units
        items.append(Item("gathered", "parameters gathered for compute (embeddings + two layers)" if gathered == units
                          else "parameters gathered for compute (kept after forward)", gathered * c, (fwd, bwd)))
    if step_temp:
        items.append(Item("step_temp", "float32 gradient partition at the optimizer step", step_temp, (step,)))

    what = {"sft": "SFT", "rm": "reward model"}[s.stage]
    with_head = " + head" if s.stage == "rm" or not shape.tied else ""
    trained = (f"LoRA adapters (r={s.lora.r})" if s.lora is not None else
               "all layers" if s.unfrozen < 0 else f"top {_plural(s.unfrozen, 'layer')}{with_head}")
    details = [f"{shape.name}: {_shape_line(shape)}",
               f"trains {trained}; {s.sequences} sequences x {s.length} tokens per micro-batch"
               f"{' (chosen + rejected)' if s.stage == 'rm' else ''}, grad_accum {s.grad_accum}, "
               f"gradient checkpointing {'on' if s.checkpointing else 'off'}; {_compute_line(s.compute, s.load_bytes)}"]
    estimate = StageEstimate(s.stage, f"{s.stage} ({what}) · {par.describe()}", details, items, [fwd, bwd, step],
                             par, gpu_memory)
    if shape.arch != "bloom":
        estimate.notes.append("activations of a Llama-style layer are approximate")
    return estimate


def _dt(nbytes: int) -> str:
    return {2: "bf16", 4: "float32"}.get(nbytes, f"{nbytes}-byte")


def _sharded(n: int) -> str:
    return f", 1/{n} per GPU" if n > 1 else ""


def _shape_line(shape: Shape) -> str:
    count = shape.total()
    size = f"{count / 1e9:.2f} B" if count >= 1e9 else f"{count / 1e6:.1f} M" if count >= 1e6 else f"{count:,}"
    line = (f"{shape.arch.upper() if shape.arch == 'bloom' else 'Llama-style'}, {size} "
            f"parameters, hidden {shape.hidden}, {shape.layers} layers, {shape.heads} heads, vocab {shape.vocab:,}")
    return line + f" (shape from the {shape.source})" if shape.source == "built-in table" else line


def _compute_line(compute: str, load_bytes: int) -> str:
    if compute == "fp32":
        return "float32 weights and math"
    return f"{_dt(load_bytes)} frozen weights, {compute} autocast over float32 trainable weights"


# -- PPO -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PPOSetup:
    """A hydra PPO step as engine/ppo/trainer.py runs it; the fields after `parallel` describe other
    harnesses (benchmarks/ppo_bench.py) that hold a few things differently."""

    shape: Shape
    load_bytes: int  # frozen weights
    compute: str  # "bf16", "fp16" or "fp32" (autocast over the float32 trainable branches when half)
    k: int
    k_v: int
    train_head: bool = True
    lora: LoraSpec | None = None
    reward: Shape | None = None  # None: a reward function
    reward_bytes: int = 2
    rollout: int = 64  # prompts per rollout, per GPU
    minibatch: int = 8  # sequences per scoring forward and per update
    prompt: int = 256
    response: int = 128
    chunk: int = 32  # prompts per decode batch
    cuda: bool = True
    parallel: Parallel = Parallel()
    generate: bool = True  # rollouts decoded here (ppo_bench scores a given batch)
    trunk_cache: bool = True
    # The BLOOM decoder keeps the trunk while it samples (engine/bloom_decoder.py `capture`): the scoring forward
    # then runs only the branches. False: the scoring forward computes and keeps it (before 2026-11-27, fifth
    # session; and every architecture the decoder does not serve).
    decoder_trunk: bool = True
    score_batch: int | None = None  # sequences per scoring forward (default: minibatch)
    optimizer: str = "fused"  # "fused" (the trainer on CUDA), "foreach", "single" (a loop, CPU)
    head: str = "fp32"  # "autocast": bf16 logits and float32 log_softmax (the heads before commit 176c622)
    held_outputs: bool = False  # ppo_bench keeps the scoring output into the first update, the last logits
    # into the optimizer step
    logprobs_in_autocast: bool = False  # ppo_bench takes the scoring log-probs inside its autocast region
    # The code before 2026-11-27's second session (measured at d1de133): split_mm added its products out of
    # place (three logits-sized tensors at once) and the trunk cache's per-minibatch parts stayed referenced.
    split_out_of_place: bool = False
    trunk_parts_held: bool = False
    # Before 2026-11-27's third session: splitting a float32 weight widened its high part again (10 bytes a
    # weight at once), the training head's three products were separate (its weight split in two parts), and
    # the log-probs' backward went through logsumexp's, gather's and a slice's own gradients.
    before_fused_head: bool = False


def ppo_counts(s: PPOSetup) -> dict[str, int]:
    """Parameter counts of the hydra's parts, as engine/ppo/hydra.py builds them."""
    shape = s.shape
    counts = {"trunk": shape.embedding + (shape.layers - s.k) * shape.layer,
              "value": s.k_v * shape.layer + shape.norm + shape.hidden}
    if s.lora is not None:
        # Adapters on the top k layers; those layers, the norm and the head stay frozen in the load dtype,
        # and the reference is the same layers with the adapters off.
        counts["trunk"] += s.k * shape.layer + shape.norm + (0 if shape.tied else shape.head)
        counts["policy"] = s.k * shape.lora_layer(s.lora.r, s.lora.target_modules, "ppo.lora.target_modules")
        counts["reference"] = 0
        return counts
    counts["policy"] = s.k * shape.layer + shape.norm + (shape.head if s.train_head else 0)
    counts["reference"] = s.k * shape.layer + shape.norm
    if not shape.tied:
        if s.train_head:
            counts["reference"] += shape.head  # a frozen copy of the untied head
        else:
            counts["trunk"] += shape.head  # one frozen head shared by both branches
    return counts


M_BUILD, M_DECODE, M_REWARD = "rollout: decoder build", "rollout: decoding", "rollout: reward model"
M_TRUNK, M_POLICY, M_REF, M_LOGPROBS, M_JOIN = ("scoring: layers", "scoring: policy head", "scoring: reference head",
                                               "scoring: log-probs", "scoring: trunk cache joined")
M_HEAD, M_FWD, M_BWD, M_STEP = "update: policy head", "update: log-probs", "update: backward", "update: optimizer step"


def ppo_estimate(s: PPOSetup, gpu_memory: int = DEFAULT_GPU_MEMORY) -> StageEstimate:
    shape, par = s.shape, s.parallel
    counts = ppo_counts(s)
    trainable = counts["policy"] + counts["value"]
    half = s.compute in ("bf16", "fp16")
    c = 2 if half else 4
    mode = "autocast" if half else "fp32"
    w = s.load_bytes
    seq = s.prompt + s.response
    keep = s.response + 1  # logits only where a response token is predicted (P-1 .. end)
    score_rows = s.score_batch or s.minibatch
    policy_head_fp32 = s.lora is None and s.train_head
    # engine/head.py: on CUDA under bf16 autocast a large head is a "split bf16" product.
    split = s.cuda and s.compute == "bf16" and s.head == "fp32" and shape.vocab >= SPLIT_MIN_OUTPUTS
    decoded = decoder_keeps_trunk(s)
    moments = ([M_BUILD, M_DECODE, M_REWARD] if s.generate else []) + [M_TRUNK, M_POLICY, M_REF, M_LOGPROBS] \
        + ([M_JOIN] if s.trunk_cache and not decoded else []) + [M_HEAD, M_FWD, M_BWD, M_STEP]
    items = _ppo_weights(s, counts, trainable, moments)
    if s.generate:
        items += _ppo_rollout(s, split, policy_head_fp32, c, mode, seq)

    # Scoring (no gradients), in minibatches; the trunk's output is kept for the updates (from the decoder,
    # back on the GPU from host memory as scoring starts, or from the scoring forward).
    if s.trunk_cache:
        trunk = s.rollout * seq * shape.hidden * 4 * _trunk_layers(s)  # float32 residual stream
        later = (M_TRUNK, M_POLICY, M_REF, M_LOGPROBS) + (() if decoded else (M_JOIN,)) \
            + (M_HEAD, M_FWD, M_BWD, M_STEP)
        items.append(Item("trunk_cache", f"trunk cache: layer inputs of {s.rollout} rollout rows (float32)", trunk,
                          later))
        if s.trunk_parts_held:  # Trunk.cat joins them into a new tensor; they were kept to the step's end
            items.append(Item("trunk_parts", "trunk cache's per-minibatch parts, still referenced", trunk,
                              (M_JOIN, M_HEAD, M_FWD, M_BWD, M_STEP)))
    items.append(Item("layer_working", f"one layer's working tensors ({score_rows} x {seq} tokens)",
                      shape.working_set(mode, score_rows, seq), (M_TRUNK,)))
    policy_linear = (0 if s.lora is not None else s.k) * shape.layer_linear
    value_linear = s.k_v * shape.layer_linear
    if half:
        # Autocast caches bf16 copies of the float32 weights it casts; the policy layers run (and are cast)
        # before the heads, the value layers after them. An update's copies are saved for its backward.
        late = (M_FWD, M_BWD) + ((M_LOGPROBS,) if s.logprobs_in_autocast else ())
        if policy_linear:
            items.append(Item("casts_policy", "autocast's bf16 copies of the policy's top layers", policy_linear * 2,
                              (M_POLICY, M_REF, M_HEAD) + late))
        items.append(Item("casts_value", "autocast's bf16 copies of the value layers", value_linear * 2, late))
    logits = _ppo_logits(s, score_rows, keep, split, policy_head_fp32, c)
    dims = f"{score_rows} x {keep} x {shape.vocab:,}"
    items.append(Item("logits_policy", f"scoring: policy logits {dims} (float32) + head temporaries",
                      logits["policy"], (M_POLICY,)))
    items.append(Item("logits_ref", "scoring: policy + reference logits + reference head temporaries",
                      logits["ref"], (M_REF,)))
    items.append(Item("logits_logprobs", "scoring: policy + reference logits + logsumexp temporary", logits["logprobs"],
                      (M_LOGPROBS,)))

    # Updates: only the trainable branches keep activations (the trunk is frozen, or cached).
    tokens = s.minibatch * seq

    def saved(layers: int) -> int:
        return layers * (tokens * shape.saved_per_token(mode) + s.minibatch * shape.saved_per_sequence(mode, seq))

    lora_saved = s.k * tokens * shape.lora_inputs(s.lora.target_modules) * (c + 1) if s.lora is not None else 0
    shared = s.minibatch * shape.shared_per_sequence(mode, seq)  # one bias for the policy and value layers
    items.append(Item("activations_policy", f"activations of the {_plural(s.k, 'policy layer')} ({s.minibatch} x "
                                            f"{seq} tokens)", saved(s.k) + lora_saved + shared, (M_HEAD, M_FWD, M_BWD)))
    items.append(Item("activations_value", f"activations of the {_plural(s.k_v, 'value layer')}", saved(s.k_v),
                      (M_FWD, M_BWD)))
    dims = f"{s.minibatch} x {keep} x {shape.vocab:,}"
    items.append(Item("logits_update", f"update: policy logits {dims} (float32) + head temporaries",
                      logits["head"], (M_HEAD,)))
    items.append(Item("logits_update_logprobs", "update: logits + logsumexp temporary", logits["update"],
                      (M_FWD,)))
    items.append(Item("logits_backward", "update: logits + their gradients (float32)", logits["backward"],
                      (M_BWD,)))
    if s.held_outputs:
        items.append(Item("held_scoring", "scoring output still referenced (ppo_bench's `out`)", logits["held"],
                          (M_HEAD,)))
        items.append(Item("held_logits", "last minibatch's logits still referenced", logits["held_update"],
                          (M_STEP,)))
    step_temp = {"fused": 0, "foreach": trainable * 4,
                 "single": max(shape.head if policy_head_fp32 else 0, shape.layer_linear) * 4}[s.optimizer]
    if step_temp:
        items.append(Item("step_temp", f"AdamW's {s.optimizer} step temporaries (float32)", step_temp, (M_STEP,)))

    chunks = f"decode batches of {s.chunk}, " if s.generate else ""
    trains = f"LoRA r={s.lora.r}" if s.lora is not None else f"train_head {str(s.train_head).lower()}"
    details = [f"{shape.name}: {_shape_line(shape)}",
               f"hydra k={s.k}, k_v={s.k_v}, {trains}; {s.rollout} prompts per rollout, {chunks}minibatches of "
               f"{s.minibatch}; {s.prompt} prompt + {s.response} response tokens; {_compute_line(s.compute, w)}"]
    estimate = StageEstimate("ppo", f"ppo (hydra PPO) · {par.describe()}", details, items, moments, par, gpu_memory)
    if shape.arch != "bloom":
        estimate.notes.append("activations of a Llama-style layer are approximate")
    return estimate


def _trunk_layers(s: PPOSetup) -> int:
    """How many layers' inputs make the trunk cache: L-k, and L-k_v when it differs."""
    return 1 if s.k == s.k_v else 2


def decoder_keeps_trunk(s: PPOSetup) -> bool:
    """Whether the rollout's decoder keeps the trunk (engine/ppo/trainer.py: the BLOOM decoder, trunk cache on)."""
    return s.generate and s.trunk_cache and s.decoder_trunk and s.shape.arch == "bloom"


def _ppo_weights(s: PPOSetup, counts: dict[str, int], trainable: int, moments: list[str]) -> list[Item]:
    """The hydra's weights, the reward model, gradients, optimizer state."""
    shape, w = s.shape, s.load_bytes
    frozen_name = f"frozen trunk: embeddings + {_plural(shape.layers - s.k, 'layer')}"
    if s.lora is not None:
        frozen_name = f"frozen base: embeddings + {_plural(shape.layers, 'layer')} + head"
    elif not shape.tied and not s.train_head:
        frozen_name += " + LM head"
    items = [Item("params_frozen", f"{frozen_name} ({_dt(w)})", counts["trunk"] * w)]
    if s.lora is not None:
        policy_name = f"policy: LoRA adapters on the top {_plural(s.k, 'layer')} (r={s.lora.r}, float32)"
    else:
        policy_name = f"policy: top {_plural(s.k, 'layer')} + norm{' + LM head' if s.train_head else ''} (float32)"
    items.append(Item("params_policy", policy_name, counts["policy"] * 4))
    items.append(Item("params_value", f"value branch: {_plural(s.k_v, 'layer')} + norm + head (float32)",
                      counts["value"] * 4))
    if s.lora is None:
        shared = "; head = the embeddings" if shape.tied else ""
        items.append(Item("reference", f"reference branch: {_plural(s.k, 'layer')} + norm ({_dt(w)}{shared})",
                          counts["reference"] * w))
    if s.reward is not None:
        items.append(Item("reward_model", f"reward model ({s.reward.name}, {_dt(s.reward_bytes)})",
                          s.reward.total("score") * s.reward_bytes))
    # Gradients live from one update to the next: zero_grad(set_to_none) runs just before each backward.
    items.append(Item("grads", f"gradients (float32, {trainable:,} trainable)", trainable * 4,
                      tuple(m for m in moments if m != M_BWD)))
    items.append(Item("optimizer", "AdamW's 2 moments (float32)", trainable * 8))
    if s.parallel.gpus > 1:  # torch DDP's buckets hold a copy of the gradients (gradient_as_bucket_view=False)
        items.append(Item("ddp_buckets", "DDP gradient buckets (float32)", trainable * 4))
    return items


def _ppo_rollout(s: PPOSetup, split: bool, policy_head_fp32: bool, c: int, mode: str, seq: int) -> list[Item]:
    """Decoding chunks of prompts (engine/bloom_decoder.py for BLOOM), then the reward model's scores."""
    shape, items = s.shape, []
    head = shape.head
    bloom = shape.arch == "bloom"
    if bloom and c == 2:
        # The decoder holds the policy's weights in the compute dtype: copies of the float32 ones (LoRA's
        # adapters, beside the frozen weights it reads as they are; every layer of a float32 model).
        frozen = shape.layers * shape.layer_linear * c if s.load_bytes == 4 else 0
        if s.lora is not None:
            copies = frozen + s.k * shape.lora_layer(s.lora.r, s.lora.target_modules, "ppo.lora.target_modules") * c
        else:
            copies = frozen or s.k * shape.layer_linear * c
        what = "every layer" if frozen else "the policy's top layers"
        items.append(Item("decoder_copies", f"decoder's bf16 copies of {what}", copies, (M_BUILD, M_DECODE)))
    # A bf16 head is its own high part: the decoder reads the model's and holds nothing more. (The
    # historical setups, `before_fused_head`, measured it widened to float32 and split like a float32 one.)
    float32_head = policy_head_fp32 or s.load_bytes == 4 or s.before_fused_head
    if bloom and split and float32_head:
        items.append(Item("decoder_head", "decoder's LM head split in bf16 (high + low parts)", head * 4, (M_DECODE,)))
        # Splitting holds the high part, the float32 difference and the remainder being written at once
        # (after a float32 copy of a bf16 head); before, also the high part widened to float32.
        build = (10 if policy_head_fp32 else 14) if s.before_fused_head else 8
        items.append(Item("decoder_build", "decoder's LM head being split (float32 temporaries)",
                          head * build, (M_BUILD,)))
    elif bloom and not split and not policy_head_fp32 and s.load_bytes != 4:
        items.append(Item("decoder_head", "decoder's float32 copy of the LM head", head * 4, (M_BUILD, M_DECODE)))
    items.append(Item("kv_cache", f"KV cache: {s.chunk} prompts x {seq} tokens x {shape.layers} layers ({_dt(c)})",
                      s.chunk * seq * shape.kv_per_token(c), (M_DECODE,)))
    items.append(Item("decode_logits", "decode step's logits (float32)",
                      s.chunk * shape.vocab * 4 * (3 if split else 1), (M_DECODE,)))
    if bloom:
        prefilled = prefill_rows(s.chunk, s.prompt)  # in slices (engine/bloom_decoder.py)
        prefill = bloom_prefill_bytes(prefilled, s.prompt, shape.hidden, shape.heads, c)
    else:
        prefilled = s.chunk
        prefill = shape.working_set(mode, s.chunk, s.prompt)
    items.append(Item("prefill", f"prefill: one layer over {prefilled} x {s.prompt} prompt tokens", prefill,
                      (M_DECODE,)))
    if decoder_keeps_trunk(s):  # a ring of positions on the GPU; the rest waits in host memory
        items.append(Item("decode_trunk", f"trunk kept by the decoder: {s.chunk} prompts x a ring of {TRUNK_RING} "
                          "positions (float32)", s.chunk * TRUNK_RING * shape.hidden * 4 * _trunk_layers(s),
                          (M_DECODE,)))
    if s.reward is not None:
        rows = min(REWARD_BATCH, s.rollout)
        items.append(Item("reward_forward", f"reward model's forward ({rows} answers, one layer at a time)",
                          s.reward.working_set(mode, rows, seq), (M_REWARD,)))
    return items


def _ppo_logits(s: PPOSetup, score_rows: int, keep: int, split: bool, policy_fp32: bool, c: int) -> dict[str, int]:
    """Bytes of the logits and their temporaries at each moment that has them."""
    head, vocab = s.shape.head, s.shape.vocab
    big_s, big_u = score_rows * keep * vocab * 4, s.minibatch * keep * vocab * 4  # float32 logits
    if s.head == "autocast":
        # bf16 logits from a Linear under autocast (a float32 head weight is cast once and cached), then
        # log_softmax over a float32 copy.
        low_s, low_u = big_s * c // 4, big_u * c // 4
        cast = head * 2 if policy_fp32 and c == 2 else 0
        return {"policy": low_s + cast, "ref": 2 * low_s + cast, "logprobs": 2 * low_s + 2 * big_s + cast,
                "head": low_u + cast, "update": low_u + 2 * big_u + cast, "backward": low_u + 3 * big_u + cast,
                "held": 2 * low_s, "held_update": low_u}
    if split:
        # A float32 weight: [high | high | remainder] (6 bytes a weight; its remainder taken in row blocks) and
        # one product into the logits. Before: the weight split first (its bf16 high part, that part widened,
        # the difference: 10 bytes a weight), its two bf16 parts held during three products. A bf16 weight
        # is its own high part: split_mm, out = hi x hi then out += lo x hi, two logits-sized tensors at once
        # (three when it added out of place).
        live = 3 if s.split_out_of_place else 2

        def forward(rows: int) -> int:
            if not policy_fp32:
                return live * rows
            if s.before_fused_head:
                return max(10 * head, 4 * head + live * rows)
            return 6 * head + rows
        policy, ref = forward(big_s), big_s + live * big_s
        update_head = forward(big_u)
    else:
        # A float32 product; a weight in another dtype is widened for the call.
        widen = 0 if s.load_bytes == 4 else 4 * head
        policy = big_s + (0 if policy_fp32 else widen)
        ref = big_s + big_s + widen
        update_head = big_u + (0 if policy_fp32 else widen)
    # Log-probs: logsumexp makes one logits-sized temporary. Backward: the logits and the log-probs' one
    # gradient (before: logsumexp's, gather's and the slice's).
    return {"policy": policy, "ref": ref, "logprobs": 3 * big_s, "head": update_head, "update": 2 * big_u,
            "backward": (4 if s.before_fused_head else 2) * big_u, "held": 2 * big_s, "held_update": big_u}


# -- a recipe --------------------------------------------------------------------------------------------

def _resolve(recipe: Recipe, path: str, seen: tuple[str, ...] = ()) -> tuple[str, str]:
    """(model path, dtype) behind a stage reference (`@sft` is that stage's model: its export has the same
    shape), or the path itself."""
    if path not in STAGE_REFS or path in seen:
        return path, "auto"
    stage = STAGE_REFS[path]
    if getattr(recipe, stage, None) is None:
        return recipe.model.path, recipe.model.dtype
    spec = recipe.stage_model(stage)
    inner, dtype = _resolve(recipe, spec.path, (*seen, path))
    return inner, spec.dtype if spec.dtype != "auto" else dtype


def resolve_reference(recipe: Recipe, path: str) -> str:
    """The model folder or hub id behind a stage reference (`@sft`): its export has that model's shape."""
    return _resolve(recipe, path)[0]


def _model_of(recipe: Recipe, stage: str) -> tuple[Shape, str]:
    section = recipe.stage(stage)  # type: ignore[arg-type]
    field_name = f"{stage}.model.path" if section.model is not None else "model.path"
    spec = recipe.stage_model(stage)  # type: ignore[arg-type]
    path, dtype = _resolve(recipe, spec.path)
    shape = load_shape(path, field_name)
    if path != spec.path:
        shape = replace(shape, name=f"{path} as {spec.path}")
    return shape, spec.dtype if spec.dtype != "auto" else dtype


def _bytes_of(dtype: str, cuda: bool) -> int:
    """Load dtype in bytes: engine/models.py torch_dtype ("auto" = bf16 on a bf16 GPU, else float32)."""
    if dtype == "auto":
        return 2 if cuda else 4
    return DTYPE_BYTES[dtype]


def _compute(precision: str, dtype: str, cuda: bool) -> str:
    """engine/models.py precision_flags."""
    if precision != "auto":
        return precision
    if dtype == "float16":
        return "fp16"
    return "bf16" if dtype == "bfloat16" or cuda else "fp32"


def stage_setup(recipe: Recipe, stage: str, parallel: Parallel, cuda: bool = True) -> TrainSetup | PPOSetup:
    """What the recipe asks of the device in `stage` (a setup the estimate functions take)."""
    shape, dtype = _model_of(recipe, stage)
    load = _bytes_of(dtype, cuda)
    section: Any = recipe.stage(stage)  # type: ignore[arg-type]
    if stage in ("sft", "rm"):
        train = section.train
        return TrainSetup(
            stage=stage, shape=shape, load_bytes=load, compute=_compute(train.precision, dtype, cuda),
            sequences=train.batch_size * (2 if stage == "rm" else 1), length=train.max_length,
            grad_accum=train.grad_accum, checkpointing=train.gradient_checkpointing,
            unfrozen=section.num_layers_unfrozen, lora=getattr(section, "lora", None), parallel=parallel)
    reward, reward_bytes = None, 2
    if section.reward_model is not None:
        path, rm_dtype = _resolve(recipe, section.reward_model)
        reward = load_shape(path, "ppo.reward_model")
        if path != section.reward_model:
            reward = replace(reward, name=f"{path} as {section.reward_model}")
        # The scorer loads with the saved dtype (transformers' "auto").
        saved = rm_dtype if rm_dtype != "auto" else (reward.dtype if reward.dtype in DTYPE_BYTES else "auto")
        reward_bytes = _bytes_of(saved, cuda)
    problem = section.too_deep_for(shape.layers, shape.name)
    if problem:
        field, why = f"ppo.{problem[0]}", problem[1]
        raise EstimateError(f"{recipe.where(field)}: {field}: {why}", {field: "not below the model's layer count"})
    ppo_parallel = parallel
    if parallel.kind in ("zero", "fsdp"):
        ppo_parallel = Parallel("ddp" if parallel.gpus > 1 else "single", parallel.gpus, source=parallel.source)
    return PPOSetup(
        shape=shape, load_bytes=load, compute=_compute(section.precision, dtype, cuda),
        k=section.num_layers_unfrozen, k_v=section.value_layers, train_head=section.trains_head, lora=section.lora,
        reward=reward, reward_bytes=reward_bytes, rollout=section.rollout_batch_size,
        minibatch=min(section.minibatch_size, section.rollout_batch_size), prompt=section.max_prompt_length,
        response=section.max_new_tokens,
        chunk=section.rollout_batch_size if section.chunk_size == "auto" else min(section.chunk_size,
                                                                                   section.rollout_batch_size),
        cuda=cuda,
        parallel=ppo_parallel, optimizer="fused" if cuda else "single")


def estimate_setup(setup: TrainSetup | PPOSetup, gpu_memory: int = DEFAULT_GPU_MEMORY) -> StageEstimate:
    if isinstance(setup, PPOSetup):
        return ppo_estimate(setup, gpu_memory)
    return train_estimate(setup, gpu_memory)


def estimate_recipe(recipe: Recipe, stages: Iterable[str] | None = None, parallel: Parallel | None = None,
                    gpu_memory: int = DEFAULT_GPU_MEMORY, cuda: bool | None = None) -> list[StageEstimate]:
    """One estimate per stage the recipe has (or those named), with advice where one does not fit.
    `cuda`: whether the stages run on GPUs (default: unless the accelerate config is a CPU one)."""
    parallel = parallel or Parallel()
    cuda = not parallel.cpu if cuda is None else cuda
    wanted = list(stages) if stages is not None else [s for s in STAGES if getattr(recipe, s, None) is not None]
    out = []
    for stage in wanted:
        if stage not in STAGES:
            raise EstimateError(f"stage {stage!r}: not one of {', '.join(STAGES)}")
        setup = stage_setup(recipe, stage, parallel, cuda)
        auto = isinstance(setup, PPOSetup) and recipe.ppo.chunk_size == "auto" and cuda
        if auto:
            setup = auto_chunk(setup, gpu_memory)
        estimate = estimate_setup(setup, gpu_memory)
        if auto:
            trunk = "the decoder keeps the trunk for the scoring forward" if decoder_keeps_trunk(setup) else (
                "the scoring forward computes the trunk (keeping it while decoding would cost a decode batch)")
            estimate.notes.append(f"ppo.chunk_size auto: {setup.chunk} prompts per decode batch, as many as "
                                  f"the memory left at rollout time holds; {trunk}")
        if isinstance(setup, PPOSetup) and parallel.kind in ("zero", "fsdp"):
            estimate.notes.append(f"the PPO trainer runs under data parallelism only (it refuses {parallel.kind}"
                                  f"): estimated as {setup.parallel.describe()}")
        if not estimate.fits:
            estimate.advice = advise(setup, estimate, gpu_memory)
        out.append(estimate)
    return out


def auto_chunk(setup: PPOSetup, gpu_memory: int) -> PPOSetup:
    """The decode batch `chunk_size: auto` takes (engine.generation.Engine.rows_that_fit): DECODE_FREE_SHARE
    of the memory free when decoding starts, less the prefill's slice, over what a row costs; and whether the
    decoder keeps the trunk (engine/ppo/rollout.py: only where that costs no decode batch)."""
    plain = replace(setup, chunk=_auto_rows(replace(setup, decoder_trunk=False), gpu_memory), decoder_trunk=False)
    if not decoder_keeps_trunk(setup):
        return plain
    keeping = _auto_rows(setup, gpu_memory)
    if trunk_costs_a_batch(plain.chunk, keeping, setup.rollout):
        return plain
    return replace(setup, chunk=keeping)


def _auto_rows(setup: PPOSetup, gpu_memory: int) -> int:
    # Two batches at least as wide as a prefill slice: their difference is what a row adds (KV cache, logits,
    # and the prefill's share where it is not sliced); the prefill's part that does not grow is fixed.
    low = prefill_rows(setup.rollout, setup.prompt)
    one, two = (ppo_estimate(replace(setup, chunk=n), gpu_memory) for n in (low, low + 8))
    per_row = (two.total(M_DECODE) - one.total(M_DECODE)) // 8
    prefill = [e.item("prefill").bytes for e in (one, two)]
    fixed = prefill[0] - low * (prefill[1] - prefill[0]) // 8
    free = gpu_memory - CONTEXT_BYTES - (one.total(M_DECODE) - low * per_row - fixed)  # the decoder built
    return decode_rows(int(free * DECODE_FREE_SHARE), fixed, per_row, setup.rollout)


# -- advice: the changes that apply to a stage, each with the peak it would give -----------------------------

def advise(setup: TrainSetup | PPOSetup, estimate: StageEstimate, gpu_memory: int) -> list[str]:
    options: list[tuple[str, TrainSetup | PPOSetup]] = []
    if isinstance(setup, PPOSetup):
        if setup.k > 1:
            options.append((f"fewer policy layers: ppo.num_layers_unfrozen=1 (k, now {setup.k})",
                            replace(setup, k=1)))
        if setup.k_v > 1:
            options.append((f"fewer value layers: ppo.value_layers={setup.k} (k_v, now {setup.k_v})",
                            replace(setup, k_v=setup.k)))
        if setup.train_head and setup.lora is None:
            options.append(("a frozen, shared LM head: ppo.train_head=false", replace(setup, train_head=False)))
        if setup.lora is None:
            options.append(("LoRA on the top k layers: ppo.lora={r: 8}", replace(setup, lora=LoraSpec())))
        if setup.generate:
            _halving(options, setup, "chunk", "ppo.chunk_size", gpu_memory)
        _halving(options, setup, "minibatch", "ppo.minibatch_size", gpu_memory)
    else:
        st = setup.stage
        if setup.lora is None and st == "sft" and setup.unfrozen < 0:
            options.append((f"LoRA: {st}.lora={{r: 8}}", replace(setup, lora=LoraSpec())))
        if setup.lora is None:
            best = _fewest_frozen(setup, gpu_memory)
            if best is not None and best != setup.unfrozen:
                options.append((f"train fewer layers: {st}.num_layers_unfrozen={best}", replace(setup, unfrozen=best)))
        if not setup.checkpointing:
            options.append((f"gradient checkpointing: {st}.train.gradient_checkpointing=true",
                            replace(setup, checkpointing=True)))
        _halving(options, setup, "sequences", f"{st}.train.batch_size", gpu_memory, per=2 if st == "rm" else 1,
                 accum=True)
        gpus = max(setup.parallel.gpus, 8)
        for stage_no, config in ((2, "zero2.yaml"), (3, "zero3.yaml")):
            current = setup.parallel
            if current.kind == "zero" and current.zero_stage >= stage_no or current.kind == "fsdp" and stage_no == 2:
                continue
            options.append((f"ZeRO-{stage_no} over {gpus} GPUs: --accelerate-config configs/accelerate/{config}",
                            replace(setup, parallel=Parallel("zero", gpus, zero_stage=stage_no))))
    lines = []
    for text, changed in options:
        after = estimate_setup(changed, gpu_memory)
        if after.peak >= estimate.peak:
            continue
        lines.append((after.needed, f"{text} -> peak {gib(after.peak)} ({'fits' if after.fits else 'still too big'})"))
    return [line for _, line in sorted(lines)]


def _halving(options: list, setup: Any, attr: str, key: str, gpu_memory: int, per: int = 1,
             accum: bool = False) -> None:
    """The largest halving of `attr` that fits (or 1 of it, if none does)."""
    value = getattr(setup, attr)
    candidate = value
    while candidate > per:
        candidate = max(candidate // 2, per)
        changed = replace(setup, **{attr: candidate})
        if accum:
            changed = replace(changed, grad_accum=setup.grad_accum * value // candidate)
        if estimate_setup(changed, gpu_memory).fits or candidate == per:
            shown = candidate // per
            extra = f" (grad_accum {changed.grad_accum} keeps the batch)" if accum else ""
            options.append((f"smaller {key.rsplit('.', 1)[-1]}: {key}={shown}{extra}", changed))
            return


def _fewest_frozen(setup: TrainSetup, gpu_memory: int) -> int | None:
    """The most top layers that can train and fit (None if not even one does)."""
    for n in range(setup.shape.layers - 1, 0, -1):
        if estimate_setup(replace(setup, unfrozen=n), gpu_memory).fits:
            return n
    return None


def report(estimates: list[StageEstimate], recipe_path: str) -> str:
    """The estimates as text, stage after stage."""
    lines = [f"memory estimate for {recipe_path} (from the model's config; nothing loaded)"]
    for estimate in estimates:
        lines += ["", *estimate.table()]
    return "\n".join(lines)
