"""LoRA adapters on one shared frozen transformer (docs/method.md §8, §9, §12).

The reference keeps three copies of the base (generator, fake score, teacher) plus a full-model EMA. Here one
frozen diffusers transformer carries named peft adapters and each trainer model is a *view* that activates
some of them for its forward: the teacher is the base with every adapter disabled, the fake score is base +
``fake``, the generator base + ``generator`` (stage 2: + the frozen, unmerged stage-1 adapter under it), its
EMA base + ``generator_ema``. A view's ``parameters()`` and ``state_dict()`` are its trainable adapter only, so
AdamW, gradient clipping, the EMA and checkpoints see exactly the LoRA weights.

Adapter switching sets peft's per-layer ``_active_adapter`` / ``_disable_adapters`` directly (peft's own
``set_adapter`` also flips ``requires_grad``), and the transformer's block checkpointing recomputes each block
under the adapters that were active when it first ran, so a generator block recomputed in backward after a fake
score forward still uses the generator's adapters.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..dtensor import like_current

#: The reference's LoRA targets (docs/method.md §12.1): attention q/k/v/out and the context projections. Suffix match,
#: so SD3.5's second attention (``attn2``) is covered too.
SD3_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def flux2_targets(num_single_layers: int) -> tuple[str, ...]:
    """FLUX.2's targets: SD3's plus the single blocks' fused ``to_qkv_mlp_proj`` and their ``attn.to_out``, named
    in full — a bare ``attn.to_out`` also matches the double blocks' ``to_out`` ModuleList and peft fails."""
    return SD3_TARGETS + ("to_qkv_mlp_proj",) + tuple(
        f"single_transformer_blocks.{i}.attn.to_out" for i in range(num_single_layers))


def _adapter_key(name: str, adapter: str) -> str | None:
    """``blocks.0.attn.to_q.lora_A.<adapter>.weight`` -> ``blocks.0.attn.to_q.lora_A.weight`` (peft's saved
    layout, what diffusers' ``save_lora_weights`` takes); ``None`` for other parameters."""
    marker = f".{adapter}."
    if marker not in name or not (".lora_A." in name or ".lora_B." in name):
        return None
    return name.replace(marker, ".", 1)


class SharedTransformer:
    """A frozen diffusers transformer with named LoRA adapters; views choose which are active per call."""

    def __init__(self, transformer: nn.Module, targets: Sequence[str]):
        self.module = transformer.requires_grad_(False).eval()
        self.targets = tuple(targets)
        self.ranks: dict[str, tuple[int, float]] = {}
        self.trainable: set[str] = set()
        self._layers: list[nn.Module] | None = None  # the LoRA layers, found once per adapter added
        # the modules that read a `gradient_checkpointing` flag (found once: every velocity call sets it)
        self._ckpt_modules = [m for m in transformer.modules() if hasattr(m, "gradient_checkpointing")]
        if getattr(transformer, "_supports_gradient_checkpointing", False):
            transformer.enable_gradient_checkpointing(gradient_checkpointing_func=self._checkpoint)
            self.set_block_checkpointing(False)

    # ------------------------------------------------------------------ adapters
    def add(self, name: str, rank: int, alpha: float, *, trainable: bool, init: str = "peft") -> None:
        """Add adapter ``name`` (rank ``rank``, scale ``alpha / rank``). ``init="peft"``: peft's gaussian init
        (A ~ N(0, 1/r), B = 0), the reference's stage-1 LoRA; ``"reference"``: A ~ N(0, 1), B = 0, the
        reference's re-init after merging (docs/method.md §13.3)."""
        from peft import LoraConfig

        if name in self.ranks:
            raise ValueError(f"adapter {name!r} exists already")
        if rank <= 0:
            raise ValueError(f"model.lora_rank must be > 0 for a LoRA adapter, got {rank}")
        if init not in ("peft", "reference"):
            raise ValueError(f"LoRA init must be 'peft' or 'reference', got {init!r}")
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(self.targets))
        before = self._active_state()
        with warnings.catch_warnings():  # several adapters on one model is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            self.module.add_adapter(config, adapter_name=name)
        self._layers = None
        self._set_active_state(before)
        self.ranks[name] = (rank, float(alpha))
        if trainable:
            self.trainable.add(name)
        self.refresh_requires_grad()  # diffusers' add_adapter -> set_adapter froze the other adapters
        if init == "reference":
            with torch.no_grad():
                for key, p in self.named_adapter_parameters(name):
                    (p.normal_(0.0, 1.0) if ".lora_A." in key else p.zero_())

    def refresh_requires_grad(self) -> None:
        """Only the trainable adapters' weights require gradient; the base and frozen adapters never do."""
        for name, p in self.module.named_parameters():
            p.requires_grad_(any(_adapter_key(name, a) is not None for a in self.trainable))

    def named_adapter_parameters(self, adapter: str) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.module.named_parameters():
            key = _adapter_key(name, adapter)
            if key is not None:
                yield key, p

    def adapter_config(self, adapter: str) -> dict:
        """The peft config of ``adapter`` as a dict (what diffusers stores as ``lora_adapter_metadata``)."""
        return self.module.peft_config[adapter].to_dict()

    def lora_layers(self) -> list[nn.Module]:
        if self._layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._layers = [m for m in self.module.modules() if isinstance(m, BaseTunerLayer)]
        return self._layers

    def _active_state(self) -> tuple[tuple[str, ...], bool] | None:
        layers = self.lora_layers()
        if not layers:
            return None
        first = layers[0]
        active = first._active_adapter
        return (tuple([active] if isinstance(active, str) else active), bool(first._disable_adapters))

    def _set_active_state(self, state: tuple[tuple[str, ...], bool] | None) -> None:
        if state is None:
            return
        names, disabled = state
        for layer in self.lora_layers():
            layer._active_adapter = list(names)
            layer._disable_adapters = disabled

    @contextmanager
    def active(self, adapters: Sequence[str]):
        """Run the base with exactly ``adapters`` active (none: the plain base, the teacher)."""
        before = self._active_state()
        self._set_active_state((tuple(adapters), not adapters) if before is not None else None)
        try:
            yield
        finally:
            self._set_active_state(before)

    # ------------------------------------------------------------------ block checkpointing
    def set_block_checkpointing(self, enable: bool) -> None:
        for m in self._ckpt_modules:
            m.gradient_checkpointing = enable

    def _checkpoint(self, block, *args):
        state = self._active_state()  # the adapters of this forward, restored when backward recomputes it

        def run(*a):
            current = self._active_state()
            self._set_active_state(state)
            try:
                return block(*a)
            finally:
                self._set_active_state(current)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


class LoraView(nn.Module):
    """The parameters of one adapter of a :class:`SharedTransformer`, as an ``nn.Module`` for optimizers, the
    EMA and checkpoints. Mixed into the backbone views (see ``rtdmd.models.diffusion``)."""

    def _init_lora_view(self, shared: SharedTransformer, adapters: Sequence[str], trainable: str | None) -> None:
        object.__setattr__(self, "shared", shared)  # not a submodule: the base is not this view's parameters
        self.adapters = tuple(adapters)
        self.trainable_adapter = trainable
        if trainable is not None and trainable not in self.adapters:
            raise ValueError(f"trainable adapter {trainable!r} is not among the active {self.adapters}")

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        if self.trainable_adapter is None:
            return iter(())
        return ((prefix + k, p) for k, p in self.shared.named_adapter_parameters(self.trainable_adapter))

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.named_parameters()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own = dict(self.named_parameters())
        missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
        if strict and (missing or unexpected):
            raise ValueError(f"LoRA state of adapter {self.trainable_adapter!r} does not match: "
                             f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        state_dict = like_current({k: v for k, v in state_dict.items() if k in own}, own)
        with torch.no_grad():
            for k, p in own.items():
                if k in state_dict:
                    p.copy_(state_dict[k])

    def requires_grad_(self, requires_grad: bool = True):
        for _, p in self.named_parameters():
            p.requires_grad_(requires_grad)
        return self

    def lora_scale(self) -> float:
        rank, alpha = self.shared.ranks[self.trainable_adapter]
        return alpha / rank


def load_adapter_state(shared: SharedTransformer, adapter: str, state: dict[str, torch.Tensor]) -> None:
    """Copy a saved LoRA state (peft keys, as a view's ``state_dict``) into ``adapter``; every key must match."""
    own = dict(shared.named_adapter_parameters(adapter))
    if set(own) != set(state):
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise ValueError(f"LoRA state for adapter {adapter!r} does not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]} (was it trained with another model.lora_rank or backbone?)")
    state = like_current(state, own)  # sharded adapters (fsdp) take their shards
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(state[k])


def combine_loras(parts: Sequence[tuple[dict[str, torch.Tensor], float]]) -> tuple[dict[str, torch.Tensor], int, float]:
    """One LoRA equal to the sum of ``parts`` (each a peft state and its scale ``alpha/r``): A's stacked on the
    rank axis, B's side by side, ``ΔW = Σ s_k B_k A_k`` exactly. Returns ``(state, rank, alpha)``; when all
    scales are equal it is kept as ``alpha/rank`` (the stock loader applies it), else folded into B."""
    scales = [s for _, s in parts]
    common = all(math.isclose(s, scales[0]) for s in scales)
    out: dict[str, torch.Tensor] = {}
    keys = list(parts[0][0])
    for state, _ in parts[1:]:
        if set(state) != set(keys):
            raise ValueError("LoRAs to combine must target the same modules")
    for k in keys:
        if ".lora_A." in k:
            out[k] = torch.cat([state[k] for state, _ in parts], dim=0)
        elif ".lora_B." in k:
            out[k] = torch.cat([state[k] * (1.0 if common else s) for state, s in parts], dim=1)
        else:
            raise ValueError(f"not a LoRA weight: {k}")
    rank = sum(next(st[k] for k in st if ".lora_A." in k).shape[0] for st, _ in parts)
    return out, rank, (scales[0] if common else 1.0) * rank
