"""Adapter kinds by name: each kind is a config dataclass + a builder, registered once.

Adding an adapter kind
----------------------
1. Write the module: `forward(tokens (B, N, width)) -> (B, N, width)`, initialized so that it outputs
   exactly zero (e.g. a zero up-projection): then a fresh adapter leaves the encoder unchanged.
   Grid-aware modules take a `TokenLayout` (clipconv/adapters/tokens.py) and skip non-patch tokens.
2. Write its config: `@dataclass class MyConfig(AdapterConfig)` with one `option(default, help=...)`
   field per hyper-parameter, its range declared with it (`check=positive`, `check=probability`, ...: enforced
   on construction and by the generated flags; cross-option rules go in `__post_init__`). `AdapterConfig`
   already holds the options of the wrapper around each sub-block: placement, sequential, scale, drop_path.
3. Register a builder that makes the adapters of one encoder (with its table label, and `mergeable=True` when
   its adapters fold into the weights they change, see clipconv/merge.py):

       @register_adapter("my_kind", config=MyConfig, label="MyKind")
       def build_my_kind(config: MyConfig, target: AdapterTarget) -> AdapterFactory:
           return AdapterFactory(make=lambda site: MyModule(target.width, config.rank))

   `make(site)` is called once per wrapped sub-block (`site` is "attn" or "mlp"); modules shared by all
   adapters go in `AdapterFactory(shared=...)` (registered once on the encoder). `placement="attn"` in
   `register_adapter` fixes the placement a kind implies (as `convpass_attn` does).
4. Import the module in clipconv/adapters/__init__.py. The contract tests (tests/test_adapter_contract.py)
   are parametrized over this registry and check the new kind at once: zero-init identity, gradients
   only in its own weights, checkpoint round trip, backbone untouched by a training step.
5. Nothing else: the method `adapter:my_kind` (convpass's training recipe, MyConfig's options) is resolved by
   the method registry, lists in `--list-methods`, and runs in Table 2 (`--methods adapter:my_kind`). A
   named method of its own (another default scale, a Table-2 row) is an `AdapterTuning` subclass in
   clipconv/methods/finetune.py with `adapter_kind = "my_kind"`.

Kinds that need more than a wrapper beside a sub-block
------------------------------------------------------
Two extension points, both through the `AdapterFactory` a builder returns:

- `AdapterFactory(make=..., wrapper=MyWrapper)`: each sub-block is wrapped by `MyWrapper(base, adapter,
  scale, drop_rate)` (an `AdaptedModule` subclass with its own `forward`, still delegating to `base`)
  instead of `ParallelAdapter` / `SequentialAdapter`.
- `AdapterFactory(inject=fn)`: the kind injects itself; `fn(visual) -> list[nn.Module]` changes the encoder
  and returns the modules it added. It must leave either `AdaptedModule` wrappers (anywhere in the encoder:
  LoRA wraps the attention modules, VPT the blocks; set `wrapper.kind`) or an `AdapterRecord` child
  (BitFit: `visual.transformer.<kind>`, no tensors, lists the parameters it trains and undoes itself), so
  that `adapter_modules`, `adapter_parameters`, `remove_adapters` and `set_adapter_scale` find it. `add_adapters`
  still validates the config, refuses a second injection, and freezes everything but the adapters.

A kind without a branch to scale (BitFit, VPT) sets `scaled: ClassVar[bool] = False` on its config: its
`scale` must stay 1 and `set_adapter_scale` refuses any other value. A kind that cannot equal the plain
encoder at initialization (VPT's prompts take attention mass) registers with `identity_at_init=False`; the
contract tests then assert that it is *not* the identity, so the flag stays truthful.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

from torch import nn

from clipconv.adapters.tokens import TokenLayout
from clipconv.config import Config, option, probability
from clipconv.registry import Registry

__all__ = ["AdapterConfig", "AdapterFactory", "AdapterKind", "AdapterTarget", "ADAPTERS", "PLACEMENTS",
           "register_adapter", "get_adapter", "make_config", "mergeable_kinds"]

PLACEMENTS = ("attn+mlp", "attn", "mlp")


@dataclass
class AdapterConfig(Config):
    """Options of the wrapper around each adapted sub-block, shared by every kind (subclass per kind)."""

    placement: Optional[str] = option(None, choices=(None, *PLACEMENTS),
                                      help="sub-blocks to adapt: attn+mlp, attn or mlp (default: the kind's own, "
                                           "else attn+mlp)")
    sequential: bool = option(False, help="adapter after its sub-block, reading its output (the Seq- ablations), "
                                          "instead of beside it reading the same normalized input")
    scale: float = option(1.0, help="scale s of the adapter branch")
    #: False for kinds with no adapter branch to scale (BitFit, VPT): their `scale` must be 1.
    scaled: ClassVar[bool] = True

    drop_path: float = option(0.0, check=probability,
                              help="stochastic depth rate of the last block (linearly 0 → rate over depth, "
                                   "timm's rule), applied to the trunk branch and the adapter branch with "
                                   "independent masks, as the official Convpass code does; 0 = off")

    def __post_init__(self) -> None:
        super().__post_init__()  # the types, ranges and choices declared with each option
        if not self.scaled and self.scale != 1.0:
            raise ValueError(f"{type(self).__name__}: this adapter kind has no branch to scale; its scale must be 1, "
                             f"got {self.scale:g}")

    def refuse_wrapper_options(self, kind: str, placement: bool = True) -> None:
        """For kinds that do not wrap sub-blocks: refuse the wrapper options they would silently ignore."""
        if placement and self.placement is not None:
            raise ValueError(f"adapter kind '{kind}' has no placement option (got placement='{self.placement}')")
        if self.sequential:
            raise ValueError(f"adapter kind '{kind}' has no sequential variant")
        if self.drop_path:
            raise ValueError(f"adapter kind '{kind}' has no drop_path option (got {self.drop_path:g})")


@dataclass(frozen=True)
class AdapterTarget:
    """What a builder may know about the encoder it adapts."""

    width: int
    layers: int
    layout: TokenLayout
    patch_size: Optional[tuple[int, int]] = None


@dataclass
class AdapterFactory:
    """Makes the adapters of one encoder: `make(site)` returns a new adapter for one sub-block ("attn" or
    "mlp"); `shared` holds modules every adapter uses (registered once on the encoder), or None; `wrapper`
    is the `AdaptedModule` class that wraps each sub-block (None: parallel or sequential, as configured).
    Or, for a kind with its own injection, `inject(visual) -> list of added modules` alone (see above)."""

    make: Optional[Callable[[str], nn.Module]] = None
    shared: Optional[nn.Module] = None
    wrapper: Optional[type] = None
    inject: Optional[Callable[[nn.Module], list]] = None

    def __post_init__(self) -> None:
        if (self.make is None) == (self.inject is None):
            raise ValueError("an AdapterFactory needs exactly one of make (wrapped sub-blocks) or inject (own injection)")
        if self.inject is not None and (self.shared is not None or self.wrapper is not None):
            raise ValueError("an AdapterFactory with its own inject takes no shared module or wrapper class")


@dataclass(frozen=True)
class AdapterKind:
    """A registered adapter kind: its config dataclass, its builder, the placement it implies (or None), its
    label in tables, and what it declares about itself: identity at initialization, and whether its trained
    adapters fold into the backbone's weights (`mergeable`: clipconv.merge, scripts/export_merged.py)."""

    name: str
    config: type[AdapterConfig]
    build: Callable[[AdapterConfig, AdapterTarget], AdapterFactory]  # called with an instance of `config`
    placement: Optional[str] = None
    identity_at_init: bool = True
    label: str = ""
    mergeable: bool = False

    def resolve_placement(self, config: AdapterConfig) -> str:
        placement = config.placement or self.placement or "attn+mlp"
        if self.placement is not None and placement != self.placement:
            raise ValueError(f"adapter kind '{self.name}' implies placement '{self.placement}', "
                             f"got placement='{placement}'")
        return placement


ADAPTERS: Registry[AdapterKind] = Registry("adapter kind")


def register_adapter(name: str, *, config: type[AdapterConfig], placement: Optional[str] = None,
                     identity_at_init: bool = True, label: Optional[str] = None, mergeable: bool = False) -> Callable:
    """Decorator registering `build(config, target) -> AdapterFactory` as adapter kind `name` (an `AdapterKind`
    entry of `ADAPTERS`).

    `identity_at_init=False` declares a kind whose fresh injection changes the encoder's output (VPT);
    `label`: its name in tables (default: `name`); `mergeable=True`: its adapters fold into the weights they
    change (every wrapper or record it leaves has `fold_()`)."""
    if placement is not None and placement not in PLACEMENTS:
        raise ValueError(f"placement of adapter '{name}' must be one of {PLACEMENTS} or None, got '{placement}'")
    if not (isinstance(config, type) and issubclass(config, AdapterConfig)):
        raise TypeError(f"adapter '{name}': config must be an AdapterConfig subclass, got {config!r}")

    def decorate(build: Callable[[AdapterConfig, AdapterTarget], AdapterFactory]) -> Callable:
        ADAPTERS.add(name, AdapterKind(name=name, config=config, build=build, placement=placement,
                                       identity_at_init=identity_at_init, label=label or name, mergeable=mergeable))
        return build

    return decorate


def get_adapter(name: str) -> AdapterKind:
    """The registered kind called `name`; ValueError listing the known ones otherwise."""
    return ADAPTERS.lookup(name)


def mergeable_kinds() -> list[str]:
    """The registered kinds that declare themselves mergeable, sorted."""
    return sorted(name for name, kind in ADAPTERS.items() if kind.mergeable)


def make_config(kind: str, config: Optional[AdapterConfig] = None, **options: object) -> AdapterConfig:
    """The config of `kind`: `config` as given (no extra options allowed then) or built from `options`
    (unknown ones raise with the list of known ones)."""
    spec = get_adapter(kind)
    if config is not None:
        if options:
            raise ValueError(f"give either a config or options for adapter '{kind}', not both ({sorted(options)})")
        if not isinstance(config, spec.config):
            raise TypeError(f"adapter '{kind}' takes a {spec.config.__name__}, got {type(config).__name__}")
    else:
        config = spec.config.from_options(options)
    spec.resolve_placement(config)  # a placement the kind excludes fails here, before any model is touched
    return config
