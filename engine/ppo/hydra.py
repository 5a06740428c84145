"""The hydra: one frozen trunk, three branches — policy, reference, value.

    embeddings + layers[0 : L-k_v] ... layers[L-k]   frozen trunk (shared)
        ├── layers[L-k:]  + final norm + LM head        policy   (the model's own modules, trainable)
        ├── copy of layers[L-k:] + norm + LM head       reference (frozen, taken before training)
        └── copy of layers[L-k_v:] + norm + scalar head value    (trainable; hangs off the frozen trunk)

One forward of the causal LM computes the trunk once and the policy on top of it. Pre-forward hooks on
layers L-k and L-k_v catch what the model itself passes to them — hidden state, attention mask, ALiBi or
rotary position embeddings — and the reference and value layers run on exactly those inputs. Nothing
about an architecture is re-implemented here, so BLOOM (ALiBi) and Llama/Qwen (rotary) work alike.

The trunk once per rollout: the trunk is frozen, so what it hands layers L-k and L-k_v for a rollout never
changes across PPO epochs and minibatches. The scoring forward keeps those hidden states (`keep_trunk`),
and every update forward takes them back (`trunk=`): only the embeddings (for the layer's other inputs:
masks, ALiBi, rotary tables, recomputed by the model itself and cheap), the top k policy layers, the top
k_v value layers and the heads run. At bloomz-7b1 with k = k_v = 2 that skips 28 of 30 layers per update.
One step earlier still: the BLOOM decoder computes the very same trunk while it samples the rollout, so it
keeps those inputs (`trunk_layers`, `trunk_from`) and the scoring forward itself runs only the branches,
the reference's included.

LoRA mode (`lora=`): adapters on the top k layers only, so the trunk stays shared; the policy is the
model with adapters on, the reference the same layers with adapters off (no copies at all), and the head
stays frozen. The value branch is as above.

An LM head tied to the embeddings (BLOOM, small Llamas) is untied for training: the policy gets its own
trainable copy and the reference keeps the original, which is the frozen embedding matrix itself (no copy
needed). With `train_head=False` the head stays tied and frozen and both branches share it, which saves
the head's weights and optimizer state (a quarter of bloomz-7b1's parameters).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from engine.head import head_fp32
from engine.models import decoder_layers

_NORM_NAMES = ("ln_f", "norm", "final_layernorm", "final_layer_norm")


def _final_norm_name(model: nn.Module) -> str:
    for name in _NORM_NAMES:
        if isinstance(getattr(model.base_model, name, None), nn.Module):
            return name
    raise ValueError(f"{type(model).__name__}: no final norm found (looked for {', '.join(_NORM_NAMES)})")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last decoder layer (BLOOM `ln_f`, Llama `norm`)."""
    return getattr(model.base_model, _final_norm_name(model))


def check_layers(num_layers: int, k: int, k_v: int) -> None:
    if not 1 <= k <= k_v < num_layers:
        raise ValueError(
            f"hydra needs 1 <= num_layers_unfrozen (k={k}) <= value_layers (k_v={k_v}) < layers ({num_layers})"
        )


@dataclass
class Trunk:
    """The frozen trunk's output for a batch: the hidden states entering layers L-k (policy) and L-k_v
    (value), as the model passed them (the same tensor when k = k_v)."""

    policy: torch.Tensor  # [B, T, hidden]
    value: torch.Tensor  # [B, T, hidden]

    def rows(self, index: torch.Tensor) -> "Trunk":
        policy = self.policy[index]
        return Trunk(policy, policy if self.value is self.policy else self.value[index])

    @staticmethod
    def cat(parts: list["Trunk"]) -> "Trunk":
        policy = torch.cat([p.policy for p in parts])
        same = all(p.value is p.policy for p in parts)
        return Trunk(policy, policy if same else torch.cat([p.value for p in parts]))


@dataclass
class HydraOutput:
    logits: torch.Tensor  # policy, [B, T, V]
    values: torch.Tensor | None  # [B, T]
    ref_logits: torch.Tensor | None  # [B, T, V]
    trunk: Trunk | None = None  # with keep_trunk


class _Stop(Exception):
    """Ends a forward pass at the first branch layer: its inputs are all that is wanted."""


class _Capture:
    """Pre-forward hook that keeps the (args, kwargs) a decoder layer is called with."""

    def __init__(self, layer: nn.Module):
        self.call: tuple[tuple, dict] | None = None
        self.handle = layer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.call = (args, kwargs)

    def remove(self) -> tuple[tuple, dict]:
        self.handle.remove()
        if self.call is None:
            raise RuntimeError("the hooked decoder layer was not called")
        return self.call


def _run_layers(layers: nn.ModuleList, call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    hidden = args[0]
    for layer in layers:
        out = layer(hidden, *args[1:], **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


class Hydra(nn.Module):
    def __init__(
        self,
        model: nn.Module,
        num_layers_unfrozen: int,
        value_layers: int,
        train_head: bool = True,
        lora: Any | None = None,
    ):
        """`lora`: a peft LoraConfig (its layers_to_transform is set here to the top k layers).

        Trainable parts are kept in float32 whatever the model's dtype (bf16 updates of lr ~1e-6 would
        round away); run the hydra under autocast when the frozen parts are bf16/fp16.
        """
        super().__init__()
        layers = decoder_layers(model)
        self.num_layers = len(layers)
        check_layers(self.num_layers, num_layers_unfrozen, value_layers)
        _check_uniform_layers(model, self.num_layers - value_layers)
        self.takes_position_ids = "position_ids" in inspect.signature(model.base_model.forward).parameters
        self.k, self.k_v = num_layers_unfrozen, value_layers
        kinds = getattr(model.config.get_text_config(), "layer_types", None)
        # A cached trunk runs the model with its first branch layer alone in the stack: the model must hand
        # that layer what it hands it in place (models with per-layer attention types may not).
        self.trunk_cacheable = not kinds or kinds[0] == kinds[self.num_layers - self.k_v]
        top = list(layers)[self.num_layers - self.k :]
        norm = final_norm(model)
        head = model.get_output_embeddings()
        model.requires_grad_(False)

        # The value branch copies plain layers, so it is taken before any adapter wraps them.
        self.value_layers = copy.deepcopy(nn.ModuleList(list(layers)[self.num_layers - self.k_v :]))
        self.value_norm = copy.deepcopy(norm)
        self.value_layers.to(torch.float32).requires_grad_(True)
        self.value_norm.to(torch.float32).requires_grad_(True)
        hidden = model.config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1, bias=False, dtype=torch.float32, device=head.weight.device)
        nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1) ** 0.5)

        self.lora = lora is not None
        self.ref_head_shared = False
        if self.lora:
            from peft import get_peft_model

            targets = lora.target_modules
            if isinstance(targets, str):
                if targets != "all-linear":
                    raise ValueError("hydra LoRA takes target_modules as a list of names, or all-linear")
                # peft takes layers_to_transform only with a list: name the Linear modules of a layer.
                targets = sorted({n.rsplit(".", 1)[-1] for n, m in top[0].named_modules() if isinstance(m, nn.Linear)})
            lora = dataclasses.replace(
                lora,
                target_modules=targets,
                layers_to_transform=list(range(self.num_layers - self.k, self.num_layers)),
                layers_pattern=_layers_attribute(model),
            )
            self.policy = get_peft_model(model, lora)
            self.ref_layers = self.ref_norm = self.ref_head = None  # the adapters switched off
            return

        self.policy = model
        tied = head.weight is model.get_input_embeddings().weight
        self.ref_layers = _frozen_copy(nn.ModuleList(top))
        self.ref_norm = _frozen_copy(norm)
        self.ref_head_shared = tied
        if tied:
            # The frozen embedding matrix is the reference head as it is: shared, never copied.
            self.ref_head = _linear_sharing(model.get_input_embeddings().weight)
            if train_head:
                head.weight = nn.Parameter(head.weight.detach().clone())
                model.config.tie_word_embeddings = False
                model.config.get_text_config().tie_word_embeddings = False
        elif train_head:
            self.ref_head = _frozen_copy(head)
        else:  # untied and frozen: both branches use the one head
            self.ref_head = head
        for module in (*top, norm) + ((head,) if train_head else ()):
            module.to(torch.float32).requires_grad_(True)

    @property
    def lm(self) -> nn.Module:
        """The transformers model itself (under the peft wrapper in LoRA mode)."""
        return self.policy.get_base_model() if self.lora else self.policy

    # The decoder layers inside the policy model, where the branches join it.
    @property
    def _layers(self) -> nn.ModuleList:
        return decoder_layers(self.lm)

    def export(self, folder: Any, merge: bool = True) -> None:
        """The policy as a plain Hugging Face folder. In LoRA mode a merged copy (training goes on), or
        with `merge=False` only the adapters (cheap, for checkpoints).

        What trained is stored in float32 and the frozen trunk as it is (bf16 for the seed recipe); the
        config then names float32, so that a plain `from_pretrained(folder)` gives the trained weights. Named
        bf16, it would round them to bf16, whose step near a weight of 0.02 is 6e-5: most of a PPO run's
        update, which is small by design (the KL penalty). Serving in bf16 stays a choice (`dtype=`)."""
        if self.lora and merge:
            merged = copy.deepcopy(self.policy)
            from peft.tuners.lora import LoraLayer

            for module in merged.modules():  # merged into float32: the adapters' update is not rounded away
                if isinstance(module, LoraLayer):
                    module.get_base_layer().float()
            merged.merge_and_unload().save_pretrained(folder)
        else:
            self.policy.save_pretrained(folder)
        if merge or not self.lora:
            from engine.models import config_names_float32

            config_names_float32(folder)

    def value_branch_parameters(self) -> list[nn.Parameter]:
        return [*self.value_layers.parameters(), *self.value_norm.parameters(), *self.value_head.parameters()]

    def init_value_from(self, reward_model: nn.Module) -> None:
        """Start the value branch from a reward model of the same architecture (its top k_v layers,
        final norm and scalar head)."""
        rm_layers = decoder_layers(reward_model)
        if len(rm_layers) != self.num_layers or reward_model.config.hidden_size != self.value_head.in_features:
            raise ValueError("the reward model's shape differs from the policy's: cannot initialise the value branch")
        top = list(rm_layers)[self.num_layers - self.k_v :]
        self.value_layers.load_state_dict(nn.ModuleList(top).state_dict())
        self.value_norm.load_state_dict(final_norm(reward_model).state_dict())
        score = getattr(reward_model, "score", None)
        if score is None or score.weight.shape != self.value_head.weight.shape:
            raise ValueError("the reward model has no scalar `score` head of the value head's shape")
        self.value_head.load_state_dict({"weight": score.weight.detach().clone()})

    def trunk_differs_from(self, reward_model: nn.Module) -> list[int] | None:
        """The layers below the value branch (the trunk it sits on) whose weights differ between the reward
        model and the policy, or None where even the input embeddings do (another base model). Empty: a
        value branch copied from the reward model computes its scores."""
        def same(a: torch.Tensor, b: torch.Tensor) -> bool:
            # In the narrower dtype: a float32 policy over a bf16 reward model of the same weights is the same
            narrow = a.dtype if a.element_size() <= b.element_size() else b.dtype
            return a.shape == b.shape and torch.equal(a.to(narrow), b.to(a.device, narrow))

        if not same(self.policy.get_input_embeddings().weight, reward_model.get_input_embeddings().weight):
            return None
        differ = []
        policy_layers, rm_layers = decoder_layers(self.policy), decoder_layers(reward_model)
        for index in range(self.num_layers - self.k_v):
            a, b = dict(policy_layers[index].named_parameters()), dict(rm_layers[index].named_parameters())
            if a.keys() != b.keys() or not all(same(a[n], b[n]) for n in a):
                differ.append(index)
        return differ

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        with_values: bool = True,
        with_ref: bool = False,
        logits_to_keep: int = 0,
        keep_trunk: bool = False,
        trunk: Trunk | None = None,
    ) -> HydraOutput:
        """Policy (and reference) logits of the last `logits_to_keep` positions (0 = all), values of all.

        `keep_trunk`: also return the trunk's output (detached) for later `trunk=` calls on the same rows,
        which then skip the frozen layers; `trunk` may also come from the decoder (`trunk_from`)."""
        extra = {}
        if attention_mask is not None and self.takes_position_ids:
            # As `generate` numbers a left-padded prompt: rotary models must score at the sampled positions.
            positions = attention_mask.long().cumsum(-1) - 1
            extra["position_ids"] = positions.masked_fill(attention_mask == 0, 1)
        if trunk is not None:
            return self._from_trunk(input_ids, attention_mask, extra, trunk, with_values, with_ref, logits_to_keep)
        layers = self._layers
        policy_call = _Capture(layers[self.num_layers - self.k]) if with_ref or keep_trunk else None
        value_call = _Capture(layers[self.num_layers - self.k_v]) if with_values or keep_trunk else None
        try:
            # The transformer itself (final norm included), not the causal-LM wrapper: the head runs below,
            # in float32, on the kept positions only.
            hidden = self.lm.base_model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra
            ).last_hidden_state
        finally:
            captured = [c.remove() if c else None for c in (policy_call, value_call)]
        logits = head_fp32(self.lm.get_output_embeddings(), _keep(hidden, logits_to_keep))
        ref_logits = values = None
        if with_ref:
            with torch.no_grad(), self._reference_weights() as (ref_layers, ref_norm, ref_head):
                hidden = _keep(_run_layers(ref_layers, captured[0]), logits_to_keep)
                ref_logits = head_fp32(ref_head, ref_norm(hidden))
        if with_values:
            hidden = self.value_norm(_run_layers(self.value_layers, captured[1]))
            values = head_fp32(self.value_head, hidden).squeeze(-1)
        kept = None
        if keep_trunk:
            policy_in, value_in = captured[0][0][0].detach(), captured[1][0][0].detach()
            kept = Trunk(policy_in, policy_in if self.k == self.k_v else value_in)
        return HydraOutput(logits=logits, values=values, ref_logits=ref_logits, trunk=kept)

    def _from_trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, extra: dict, trunk: Trunk,
                    with_values: bool, with_ref: bool, logits_to_keep: int) -> HydraOutput:
        args, kwargs = self._branch_call(input_ids, attention_mask, extra)
        # In the dtype the model hands its layers here: a decoder's float32 residual stream (CUDA autocast's)
        # meets a bf16 one under CPU autocast, whose layer norms do not take float32 inputs with bf16 weights.
        policy = trunk.policy.to(args[0].dtype)
        trunk = Trunk(policy, policy if trunk.value is trunk.policy else trunk.value.to(policy.dtype))
        top = nn.ModuleList(list(self._layers)[self.num_layers - self.k :])
        hidden = final_norm(self.lm)(_run_layers(top, ((trunk.policy, *args[1:]), kwargs)))
        logits = head_fp32(self.lm.get_output_embeddings(), _keep(hidden, logits_to_keep))
        ref_logits = values = None
        if with_ref:
            with torch.no_grad(), self._reference_weights() as (ref_layers, ref_norm, ref_head):
                hidden = _keep(_run_layers(ref_layers, ((trunk.policy, *args[1:]), kwargs)), logits_to_keep)
                ref_logits = head_fp32(ref_head, ref_norm(hidden))
        if with_values:
            hidden = self.value_norm(_run_layers(self.value_layers, ((trunk.value, *args[1:]), kwargs)))
            values = head_fp32(self.value_head, hidden).squeeze(-1)
        return HydraOutput(logits=logits, values=values, ref_logits=ref_logits)

    @property
    def trunk_layers(self) -> tuple[int, ...]:
        """The layers whose inputs make a `Trunk` (to capture while decoding): L-k, and L-k_v when it differs."""
        return tuple(sorted({self.num_layers - self.k, self.num_layers - self.k_v}))

    def trunk_from(self, captured: dict[int, torch.Tensor]) -> Trunk:
        """The `Trunk` of inputs captured at `trunk_layers` (by the BLOOM decoder while it sampled the rows)."""
        policy = captured[self.num_layers - self.k]
        return Trunk(policy, captured[self.num_layers - self.k_v])

    def _branch_call(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     extra: dict) -> tuple[tuple, dict]:
        """The (args, kwargs) the model calls its first branch layer with (hidden state aside): the model
        runs with that layer alone in its stack and stops as it enters it, so only the embeddings and the
        mask / position preparation run."""
        if not self.trunk_cacheable:
            raise ValueError("this model gives its layers different attention types: the trunk cannot be cached")
        owner, name = _layer_list_owner(self.lm)
        stack = getattr(owner, name)
        first = stack[self.num_layers - self.k_v]
        seen: list[tuple[tuple, dict]] = []

        def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen.append((args, kwargs))
            raise _Stop

        handle = first.register_forward_pre_hook(stop, with_kwargs=True)
        setattr(owner, name, nn.ModuleList([first]))
        try:
            self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
        except _Stop:
            pass
        finally:
            setattr(owner, name, stack)
            handle.remove()
        if not seen:
            raise RuntimeError("the first branch layer was not called")
        return seen[0]

    @contextmanager
    def _reference_weights(self) -> Iterator[tuple[nn.Module, nn.Module, nn.Module]]:
        """(top layers, final norm, head) of the reference branch."""
        if not self.lora:
            yield self.ref_layers, self.ref_norm, self.ref_head
            return
        top = nn.ModuleList(list(self._layers)[self.num_layers - self.k :])
        with self.policy.disable_adapter():
            yield top, final_norm(self.lm), self.lm.get_output_embeddings()

    @contextmanager
    def as_reference(self) -> Iterator[nn.Module]:
        """The policy model with the reference branch swapped in, e.g. to generate the reference's own
        answers with the model's `generate`. No gradients; everything is put back on exit."""
        if self.lora:
            with torch.no_grad(), self.policy.disable_adapter():
                yield self.policy
            return
        layers = self._layers
        top = range(self.num_layers - self.k, self.num_layers)
        own_layers = [layers[i] for i in top]
        norm_name = _final_norm_name(self.policy)
        own_norm = getattr(self.policy.base_model, norm_name)
        own_head = self.policy.get_output_embeddings()
        try:
            for i, ref in zip(top, self.ref_layers):
                layers[i] = ref
            setattr(self.policy.base_model, norm_name, self.ref_norm)
            self.policy.set_output_embeddings(self.ref_head)
            with torch.no_grad():
                yield self.policy
        finally:
            for i, own in zip(top, own_layers):
                layers[i] = own
            setattr(self.policy.base_model, norm_name, own_norm)
            self.policy.set_output_embeddings(own_head)

    def branch_state(self) -> dict[str, Any]:
        """Reference and value branches, for a full-state checkpoint beside the exported policy.

        A reference head that is the embedding matrix is not saved: the policy folder holds it.
        """
        state: dict[str, Any] = {
            "value_layers": self.value_layers.state_dict(),
            "value_norm": self.value_norm.state_dict(),
            "value_head": self.value_head.state_dict(),
            "ref_head_shared": self.ref_head_shared,
        }
        if self.lora:
            from peft import get_peft_model_state_dict

            state["adapter"] = get_peft_model_state_dict(self.policy)
            return state
        state.update(ref_layers=self.ref_layers.state_dict(), ref_norm=self.ref_norm.state_dict())
        if not self.ref_head_shared:
            state["ref_head"] = self.ref_head.state_dict()
        return state

    def load_branch_state(self, state: dict[str, Any]) -> None:
        """Restore the branches of `branch_state` onto a hydra built from the saved policy."""
        state = dict(state)
        self.ref_head_shared = state.pop("ref_head_shared")
        adapter = state.pop("adapter", None)
        if adapter is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.policy, adapter)
        if self.ref_head_shared:
            self.ref_head = _linear_sharing(self.policy.get_input_embeddings().weight)
        for name, module_state in state.items():
            getattr(self, name).load_state_dict(module_state)


def _keep(hidden: torch.Tensor, last: int) -> torch.Tensor:
    return hidden[:, -last:] if last else hidden


def _check_uniform_layers(model: nn.Module, first_branch_layer: int) -> None:
    """The branches reuse one layer's inputs for every layer above it; models that give layers different
    masks (sliding-window or local/global layers) would be scored wrongly, so they are refused."""
    kinds = getattr(model.config.get_text_config(), "layer_types", None)
    if kinds and len(set(kinds[first_branch_layer:])) > 1:
        raise ValueError(f"the top layers mix attention types {sorted(set(kinds[first_branch_layer:]))}: not supported")


def _layer_list_owner(model: nn.Module) -> tuple[nn.Module, str]:
    """(module, attribute) holding the decoder-layer list."""
    layers = decoder_layers(model)
    for module in model.modules():
        for name, child in module.named_children():
            if child is layers:
                return module, name
    raise ValueError(f"{type(model).__name__}: the decoder layers have no owner")


def _layers_attribute(model: nn.Module) -> str:
    """The attribute name of the decoder-layer list (`h`, `layers`), which peft's layers_pattern wants."""
    layers = decoder_layers(model)
    name = next(name for name, module in model.named_modules() if module is layers)
    return name.rsplit(".", 1)[-1]


def _linear_sharing(weight: nn.Parameter) -> nn.Linear:
    """A frozen bias-free linear head whose weight is `weight` itself (the embedding matrix)."""
    vocab, hidden = weight.shape
    head = nn.Linear(hidden, vocab, bias=False, device="meta")
    head.weight = weight
    head.requires_grad_(False)
    return head


def _frozen_copy(module: nn.Module) -> nn.Module:
    clone = copy.deepcopy(module)
    clone.requires_grad_(False)
    return clone
