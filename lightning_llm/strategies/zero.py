"""ZeROStrategy: ZeRO data parallelism, stages 1, 2 and 3, as a Lightning strategy on torch.distributed.

Plain data parallelism keeps a whole copy of the parameters, gradients and optimizer state on every
rank. ZeRO (Rajbhandari et al., 2020) partitions them over the N data-parallel ranks:

    stage 1  optimizer state sharded                       params Ψ   grads Ψ    optimizer Ψ/N
    stage 2  + gradients sharded                           params Ψ   grads Ψ/N  optimizer Ψ/N
    stage 3  + parameters sharded (gathered per layer)     params Ψ/N grads Ψ/N  optimizer Ψ/N

How each stage is built from torch.distributed:

- Stage 1: `DistributedDataParallel` all-reduces the full gradients; the optimizer is re-pointed at
  dim-0 shards (`DTensor`, `Shard(0)`, the same cut `fully_shard` makes) that are views of the
  replicated parameters, so it holds 1/N of every state tensor; after the step every parameter is
  all-gathered. `ZeroRedundancyOptimizer` does the same but gives each rank whole parameters: on a
  small Llama the tied embedding alone is most of the model, so one rank would hold ~1.5x its share
  (see benchmarks/zero.py). Communication is an all-reduce plus an all-gather, 1.5x DDP.
- Stage 2: `fully_shard(reshard_after_forward=False)`: each layer's parameters are all-gathered
  once in forward and stay whole until backward ends; gradients are reduce-scattered. FSDP2 frees
  the whole parameters after backward, so between steps a rank holds only its Ψ/N shard (less than
  ZeRO-2's always-whole Ψ); from forward to the end of backward it holds Ψ + Ψ/N. Communication:
  reduce-scatter + all-gather, as DDP.
- Stage 3: `fully_shard(reshard_after_forward=True)`: parameters are gathered per layer in forward
  and again in backward (1.5x DDP's communication).

Models are created on the meta device in `configure_model` and materialised one FSDP unit (decoder
layer) at a time right before it is sharded, so a model never exists whole on one rank at stages 2
and 3. Checkpoints are `torch.distributed.checkpoint` directories in the format of `lightning_llm.checkpoint`
(each rank writes its shards, `meta.pt` holds the rest and is written last, the directory is renamed
into place); they load on any number of ranks, and `lightning_llm.checkpoint.load_checkpoint` turns
one into an ordinary Lightning checkpoint dict on a single process. Under each parameter's name a
checkpoint holds the tensor the optimizer steps (the stage-1 shard, or the fp32 master of
`MasterWeightsPrecision`) and, keyed by the same name, its optimizer state: every rank writes its own
rows at every stage, and a master-weights run saves, resumes and exports its fp32 masters.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import timedelta
from typing import Any, Generator

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.fsdp import _move_torchmetrics_to_device
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Trainer
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.strategy import _ForwardRedirection
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from lightning_llm.checkpoint import check_optimizer_layout, open_sharded, remove_checkpoint, save_sharded
from lightning_llm.protocols import restore_forward
from lightning_llm.strategies.launch import check_launch_size

STAGES = (1, 2, 3)


class ZeROStrategy(ModelParallelStrategy):
    """ZeRO data parallelism (stages 1, 2, 3) over all processes, for any LightningModule.

    Args:
        stage: 1 shards the optimizer state, 2 also the gradients, 3 also the parameters.
        cpu_offload: stages 2 and 3 only: keep the sharded parameters (the fp32 master copy), their
            gradients and the optimizer state in CPU memory and run the optimizer step there
            (ZeRO-Offload; at stage 3 this offloads the parameters too). FSDP2's `CPUOffloadPolicy`.
        wrap: class names of the modules that become one sharding unit each (and are checkpointed
            with `activation_checkpointing`). Default: the `_no_split_modules` of the Hugging Face
            models inside the LightningModule, i.e. one unit per decoder layer. The rest of the
            LightningModule is one more unit.
        activation_checkpointing: recompute each unit's activations in backward.
        empty_init: create the model of `configure_model` on the meta device and initialise it unit
            by unit (`_init_weights` of the owning Hugging Face model, else `reset_parameters`).
            Set False when `configure_model` loads pretrained weights.
        process_group_backend: "nccl", "gloo", ...; default: NCCL on GPUs, gloo on CPUs.
        timeout: timeout of the collectives.

    Precision: the project's `MixedPrecision("fp16-mixed")` (its overflow verdict is all-reduced, so
    an inf in one rank's shard makes every rank skip the step) and `MixedPrecision("bf16-mixed")`
    work at every stage (their fp32 weights are the masters, so checkpoints take the fp32 path).
    `MasterWeightsPrecision("bf16")` works at every stage, checkpoints included: the checkpoint's
    weights are the fp32 masters, sharded as the optimizer state is (the bf16 weights are their
    rounding, recomputed on load), so a resumed run continues bit for bit and an export gets the fp32
    masters. Lightning's `precision="16-mixed"` is refused (its GradScaler does not agree on overflow
    across ranks). Gradient clipping by norm works at every stage: the optimizer's gradients are
    `DTensor` shards, so the norm is global.
    """

    def __init__(
        self,
        stage: int = 2,
        *,
        cpu_offload: bool = False,
        wrap: Sequence[str] | None = None,
        activation_checkpointing: bool = False,
        empty_init: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(save_distributed_checkpoint=True, process_group_backend=process_group_backend, timeout=timeout)
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if cpu_offload and stage == 1:
            raise ValueError("cpu_offload=True needs stage 2 or 3 (sharded parameters to offload), got stage=1")
        if isinstance(wrap, str):
            wrap = [wrap]
        self.stage = stage
        self.cpu_offload = cpu_offload
        self.wrap = list(wrap) if wrap is not None else None
        self.activation_checkpointing = activation_checkpointing
        self.empty_init = empty_init
        self._optimizer_shards: dict[int, OptimizerShards] = {}

    # -- processes -------------------------------------------------------------------------------

    def setup_environment(self) -> None:
        check_launch_size(self)  # before the rendezvous, which a wrong size would wait in
        self._setup_distributed()
        # One data-parallel dimension over all processes of all nodes.
        self._device_mesh = init_device_mesh(self.root_device.type, (self.world_size,), mesh_dim_names=("data_parallel",))
        self.lightning_module._device_mesh = self._device_mesh

    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        meta = self.empty_init if empty_init is None else empty_init
        with torch.device("meta") if meta else nullcontext(), self.precision_plugin.tensor_init_context():
            yield

    # -- model -----------------------------------------------------------------------------------

    def setup(self, trainer: Trainer) -> None:
        self.accelerator.setup(trainer)
        module = self.lightning_module
        # A module that an earlier run prepared for this layout (fit, then validate with a new Trainer) keeps its
        # sharding and checkpointing hooks: torch applies each only once.
        prepared = _prepared_before(module, self._layout())
        units = [] if prepared else self._units(module)
        if self.stage == 1:
            # Stage 1 replicates the parameters: the whole model is materialised on every rank.
            _materialize(module, list(module.modules()), self.root_device)
            self._checkpoint_activations(units)
            module = self.precision_plugin.convert_module(module)
            self.model_to_device()
            self.model = self._replicate(module)
        else:
            if not prepared:
                self._shard(module, units)
            self.model = self.precision_plugin.convert_module(module)
            _move_torchmetrics_to_device(module, self.root_device)
        module._zero_layout = self._layout()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def _units(self, module: nn.Module) -> list[nn.Module]:
        """The modules that become one sharding unit each, children before parents."""
        names = set(self.wrap) if self.wrap is not None else {
            name for m in module.modules() if _is_hf_model(m) for name in (m._no_split_modules or [])
        }
        units = [m for m in module.modules() if type(m).__name__ in names and m is not module]
        if self.wrap is not None and not units:
            present = sorted({type(m).__name__ for m in module.modules()})
            raise ValueError(f"wrap={self.wrap}: the model has no module of these classes; it has {present}")
        if self.activation_checkpointing and not units:
            raise ValueError("activation_checkpointing=True needs units to checkpoint: pass wrap=[<block class name>]")
        return units[::-1]  # module.modules() is pre-order: reversed, every unit comes after its sub-units

    def _checkpoint_activations(self, units: list[nn.Module]) -> None:
        if self.activation_checkpointing:
            from torch.distributed._composable import checkpoint  # hooks: keeps the parameter names

            for unit in units:
                checkpoint(unit)

    def _shard(self, module: nn.Module, units: list[nn.Module]) -> None:
        """Materialise and `fully_shard` each unit in turn, the roots (the LightningModule: it holds the rest) last."""
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        self._checkpoint_activations(units)
        offload = CPUOffloadPolicy(pin_memory=self.root_device.type == "cuda") if self.cpu_offload else OffloadPolicy()
        done: set[nn.Module] = set()
        for unit in [*units, *self._sharding_roots(module)]:
            members = _members(unit, done)
            _materialize(module, members, self.root_device)
            self._parallelize(members)
            fully_shard(unit, mesh=self._data_mesh(), reshard_after_forward=self.stage == 3, offload_policy=offload,
                        ignored_params=_split_over(members, self._data_mesh()) or None)
            done.add(unit)

    def _layout(self) -> tuple:
        """What a module is prepared for: the stage and the mesh (its ranks and dimension names)."""
        return self.stage, self.device_mesh.mesh.tolist(), self.device_mesh.mesh_dim_names

    def _replicate(self, module: nn.Module) -> nn.Module:
        """Stage 1: the module the steps call, wrapped so that backward all-reduces its gradients."""
        return DistributedDataParallel(module, device_ids=None if self.root_device.type == "cpu" else [self.root_device.index])

    def _sharding_roots(self, module: nn.Module) -> list[nn.Module]:
        """The outermost sharding units, whose forward the steps call: the LightningModule (under
        `ParallelStrategy`'s pipeline: this rank's stages, which the schedule calls)."""
        return [module]

    def _data_mesh(self) -> DeviceMesh:
        """The mesh that ZeRO shards over: all processes here; the data-parallel dimension of a larger mesh."""
        return self.device_mesh

    def _parallelize(self, members: list[nn.Module]) -> None:
        """Split freshly materialised modules before they are sharded; nothing here (`ParallelStrategy`: TP)."""

    # -- steps -----------------------------------------------------------------------------------
    # The LightningModule is the root FSDP unit (or wrapped by DDP): its steps must run inside the
    # root's forward so that its hooks gather the parameters; `_forward_redirection` does that.

    def _redirect(self, context: AbstractContextManager, name: str, *args: Any, **kwargs: Any) -> Any:
        with context:
            return _RootStepRedirection()(self.model, self.lightning_module, name, *args, **kwargs)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._redirect(self.precision_plugin.train_step_context(), "training_step", *args, **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._redirect(self.precision_plugin.val_step_context(), "validation_step", *args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._redirect(self.precision_plugin.test_step_context(), "test_step", *args, **kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._redirect(self.precision_plugin.predict_step_context(), "predict_step", *args, **kwargs)

    # -- optimizer (stage 1 shards it here; stages 2 and 3 get DTensor parameters from fully_shard) --

    def setup_optimizers(self, trainer: Trainer) -> None:
        super().setup_optimizers(trainer)
        if self.stage == 1:
            if not self.lightning_module.automatic_optimization:
                raise ValueError("ZeROStrategy(stage=1) supports automatic optimization only; use stage 2 or 3")
            self._optimizer_shards = {
                id(opt): OptimizerShards(self.lightning_module, opt, self._data_mesh()) for opt in self.optimizers
            }

    def post_backward(self, closure_loss: torch.Tensor) -> None:
        # Clipping and the step use the shards' gradients: point them at the reduced full gradients.
        for shards in self._optimizer_shards.values():
            shards.attach_grads()

    def optimizer_step(self, optimizer: Optimizer, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        shards = self._optimizer_shards.get(id(_unwrap(optimizer)))
        if shards is not None:
            shards.gather_params()
            shards.release_grads()
        return output

    # -- checkpoints -----------------------------------------------------------------------------

    # A checkpoint stores, under each parameter's name, the tensor that the optimizer steps for it, and
    # that tensor's optimizer state: so every rank writes only its own rows (at stage 1 too, where the
    # parameters are replicated), and under MasterWeightsPrecision the fp32 masters are the weights
    # (the bf16 weights are their rounding; export gets the masters). torch's get_optimizer_state_dict
    # cannot be used: it names only the model's own parameters, not the shards or masters stepped here.

    def _master_weights(self, optimizer: Optimizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # MasterWeightsPrecision's (weight, fp32 master) pairs, duck-typed: strategies/ and precision/
        # do not import each other.
        master_weights = getattr(self.precision_plugin, "master_weights", None)
        return master_weights(optimizer) if master_weights is not None else []

    def stand_ins(self) -> dict[int, torch.Tensor]:
        """id(parameter) -> the tensor an optimizer steps for it: the parameter at stages 2 and 3, its dim-0
        shard at stage 1, or the fp32 master standing in for either."""
        shards = {id(p): shard for s in self._optimizer_shards.values() for _, p, shard in s.params}
        masters = {id(weight): master for opt in self.optimizers for weight, master in self._master_weights(opt)}
        stand_ins = {}
        for p in self.lightning_module.parameters():
            t = shards.get(id(p), p)
            stand_ins[id(p)] = masters.get(id(t), t)
        return stand_ins

    def _stepped_tensors(self) -> dict[str, torch.Tensor]:
        """Parameter name (a tied parameter under each of its names) -> the tensor an optimizer steps for
        it (`stand_ins`). Parameters that no optimizer steps (frozen ones) are left out."""
        stand_ins = self.stand_ins()
        stepped = {id(t) for opt in self.optimizers for group in opt.param_groups for t in group["params"]}
        tensors = {}
        for name, p in self.lightning_module.named_parameters(remove_duplicate=False):
            t = stand_ins[id(p)]
            if id(t) in stepped:
                tensors[name] = t
        return tensors

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return {**super().lightning_module_state_dict(), **self._stepped_tensors()}

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        return _optimizer_state_by_name(_unwrap(optimizer), _names(self._stepped_tensors()))

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("ZeROStrategy.save_checkpoint(storage_options=...) is not supported: it writes "
                            "torch.distributed.checkpoint directories, not through CheckpointIO")
        save_sharded(self, checkpoint, filepath)

    def remove_checkpoint(self, filepath: _PATH) -> None:
        if self.is_global_zero:
            remove_checkpoint(filepath)

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a sharded checkpoint written on any number of ranks into this run's shards."""
        from torch.distributed.checkpoint import DefaultLoadPlanner, load
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

        path, meta = open_sharded(self.broadcast(str(checkpoint_path)))
        check_optimizer_layout(path)
        stepped = self._stepped_tensors()
        names = _names(stepped)
        state: dict[str, Any] = {"state_dict": {**get_model_state_dict(self.model), **stepped}}
        for idx, optimizer in enumerate(self.optimizers):
            state[f"optimizer_{idx}"] = _optimizer_state_by_name(optimizer, names, initialize=True)
        # A module that loads non-strictly (LoRA: the checkpoint holds the adapters, not the frozen base)
        # takes the keys the checkpoint has and keeps its own values for the rest.
        strict = self.lightning_module.strict_loading
        load(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=not strict))
        # `load` fills the stepped tensors in place (the key check was its job); the rest of the model
        # (frozen parameters, buffers) is set here, and the weights are then derived from what was stepped.
        rest = {k: v for k, v in state["state_dict"].items() if k not in stepped}
        set_model_state_dict(self.model, rest, options=StateDictOptions(strict=False))
        for idx, optimizer in enumerate(self.optimizers):
            _load_optimizer_state_by_name(optimizer, state[f"optimizer_{idx}"], stepped)
            if self._master_weights(optimizer):
                self.precision_plugin.copy_masters_to_weights(optimizer)
        for shards in self._optimizer_shards.values():
            shards.gather_params()
        return meta

    def teardown(self) -> None:
        if isinstance(self.model, DistributedDataParallel):
            self.model = self.lightning_module
        self._optimizer_shards = {}
        super().teardown()


class OptimizerShards:
    """ZeRO-1 for any `torch.optim` optimizer: it steps dim-0 shards of the replicated parameters.

    The optimizer object itself is kept (learning-rate schedulers hold it); its param groups are
    re-pointed from the parameters to `DTensor` shards that view the parameters' storage, so the
    step updates this rank's rows in place and allocates state for them only.
    """

    def __init__(self, module: nn.Module, optimizer: Optimizer, mesh: DeviceMesh) -> None:
        if optimizer.state:
            raise ValueError("OptimizerShards must wrap an optimizer before its first step")
        self.mesh = mesh
        names = {id(p): name for name, p in module.named_parameters()}
        self.params: list[tuple[str, nn.Parameter, nn.Parameter]] = []  # (name, parameter, shard)
        for group in optimizer.param_groups:
            shards = []
            for p in group["params"]:
                shard = nn.Parameter(self._shard_of(p.detach()), requires_grad=p.requires_grad)
                self.params.append((names[id(p)], p, shard))
                shards.append(shard)
            group["params"] = shards
        self.optimizer = optimizer

    def _shard_of(self, tensor: torch.Tensor) -> DTensor:
        """This rank's rows of `tensor` as a view, cut as `Shard(0)` cuts (ceil-sized, trailing ones may be empty)."""
        if tensor.ndim == 0:
            return DTensor.from_local(tensor, self.mesh, [Replicate()], run_check=False)
        n, rank = self.mesh.size(), self.mesh.get_local_rank()
        rows = -(-tensor.shape[0] // n)
        start = min(rank * rows, tensor.shape[0])
        local = tensor.narrow(0, start, min(rows, tensor.shape[0] - start))
        return DTensor.from_local(local, self.mesh, [Shard(0)], run_check=False, shape=tensor.shape, stride=tensor.stride())

    def attach_grads(self) -> None:
        for _, p, shard in self.params:
            shard.grad = None if p.grad is None else self._shard_of(p.grad)

    def gather_params(self) -> None:
        with torch.no_grad():
            for _, p, shard in self.params:
                p.copy_(shard.full_tensor())

    def release_grads(self) -> None:
        for _, p, _ in self.params:
            p.grad = None


def state_bytes(module: nn.Module, optimizers: Iterable[Optimizer] = ()) -> dict[str, int]:
    """Bytes this rank holds of parameters, gradients and optimizer state (local shards only)."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    params = list(module.parameters())
    return {
        "params": sum(local(p).nbytes for p in params),
        "grads": sum(local(p.grad).nbytes for p in params if p.grad is not None),
        "optimizer": sum(
            local(v).nbytes for opt in optimizers for state in _unwrap(opt).state.values()
            for v in state.values() if isinstance(v, torch.Tensor)
        ),
    }


# -- helpers -------------------------------------------------------------------------------------


def _names(stepped: dict[str, torch.Tensor]) -> dict[int, str]:
    """id(stepped tensor) -> its parameter's name (a tied parameter's first name, as `named_parameters`)."""
    names: dict[int, str] = {}
    for name, t in stepped.items():
        names.setdefault(id(t), name)
    return names


def _optimizer_state_by_name(optimizer: Optimizer, names: dict[int, str], initialize: bool = False) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, tensors as this rank's `DTensor` shards (the layout
    of `get_optimizer_state_dict` for a `fully_shard`ed model); `initialize` creates empty state first."""
    if initialize:
        from torch.distributed.checkpoint.state_dict import _init_optim_state

        _init_optim_state(optimizer)
    return {
        "state": {names[id(t)]: state for t, state in optimizer.state.items()},
        "param_groups": [
            {**{k: v for k, v in group.items() if k != "params"}, "params": [names[id(t)] for t in group["params"]]}
            for group in optimizer.param_groups
        ],
    }


def _load_optimizer_state_by_name(optimizer: Optimizer, state_dict: dict[str, Any], stepped: dict[str, torch.Tensor]) -> None:
    for name, values in state_dict["state"].items():
        target = optimizer.state[stepped[name]]
        for key, value in values.items():
            if isinstance(target.get(key), torch.Tensor):
                target[key].copy_(value)
            else:
                target[key] = value
    for group, saved in zip(optimizer.param_groups, state_dict["param_groups"]):
        group.update({k: v for k, v in saved.items() if k != "params"})


def _unwrap(optimizer: Optimizer) -> Optimizer:
    return optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


def _is_hf_model(module: nn.Module) -> bool:
    # Duck-typed so that strategies/ does not import transformers: a PreTrainedModel has both.
    return hasattr(module, "_no_split_modules") and callable(getattr(module, "_init_weights", None))


def _split_over(members: list[nn.Module], mesh: DeviceMesh) -> set[nn.Parameter]:
    """Parameters of `members` that another parallelism has already split over `mesh` (expert parallelism's
    experts, `DTensor`s on the data-parallel mesh): ZeRO leaves them as they are."""
    return {p for m in members for p in m.parameters(recurse=False) if isinstance(p, DTensor) and p.device_mesh == mesh}


def _prepared_before(module: nn.Module, layout: tuple) -> bool:
    """Whether an earlier run prepared `module` for `layout`; raises if for another one, which it cannot be undone for."""
    before = getattr(module, "_zero_layout", None)
    if before is not None and before != layout:
        raise ValueError(f"{type(module).__name__} was prepared by an earlier run for ZeRO stage {before[0]} on the mesh "
                         f"{before[1]} {before[2]}, and cannot be sharded again for stage {layout[0]} on {layout[1]} "
                         f"{layout[2]}: create a new module (and load a checkpoint of the earlier run into it)")
    return before is not None


class _RootStepRedirection(_ForwardRedirection):
    """Lightning's forward redirection (the step runs inside the root's forward, whose FSDP hooks gather the
    root's own parameters: embedding, final norm, LM head), except that a step which calls the module itself
    (`self(...)`, as this project's modules do) does not enter those hooks a second time.

    FSDP2 has no guard against re-entering a module's hooks: the inner call's post-forward marks the root
    idle, so the outer post-forward then frees the root's parameters even at stage 2
    (`reshard_after_forward=False`) and backward gathers them again: one embedding more per step than ZeRO-2's
    Ψ (measured with `benchmarks/parallel.py`: 2.376 MiB gathered against 1.376 on `tiny`). Nested calls are
    left alone under manual optimization: a step that runs backward itself frees the root in it, and a later
    forward in the same step needs the hooks to gather the root again."""

    def __call__(self, wrapper_module: nn.Module, original_module: Any, method_name: str, *args: Any, **kwargs: Any) -> Any:
        if wrapper_module is not original_module or not original_module.automatic_optimization:
            return super().__call__(wrapper_module, original_module, method_name, *args, **kwargs)
        shadowed = original_module.__dict__.get("forward")

        def step(*step_args: Any, **step_kwargs: Any) -> Any:
            restore_forward(original_module, shadowed)  # the step may call the real forward ...
            with _forward_hooks_suspended(original_module):  # ... as part of this one
                return getattr(original_module, method_name)(*step_args, **step_kwargs)

        original_module.forward = step
        try:
            return wrapper_module(*args, **kwargs)
        finally:
            restore_forward(original_module, shadowed)


@contextmanager
def _forward_hooks_suspended(module: nn.Module) -> Generator[None, None, None]:
    """`module(...)` runs its forward alone: its own forward (pre-)hooks already ran for the enclosing call."""
    hooks = module._forward_pre_hooks, module._forward_hooks
    module._forward_pre_hooks, module._forward_hooks = OrderedDict(), OrderedDict()
    try:
        yield
    finally:
        module._forward_pre_hooks, module._forward_hooks = hooks


def _members(unit: nn.Module, done: set[nn.Module]) -> list[nn.Module]:
    """The modules of `unit` not inside an already sharded unit, children before parents."""
    found, stack = [], [unit]
    while stack:
        m = stack.pop()
        found.append(m)
        stack.extend(c for c in m.children() if c not in done)
    return found[::-1]


def _materialize(root: nn.Module, members: list[nn.Module], device: torch.device) -> None:
    """Allocate the meta tensors of `members` on `device` and initialise them.

    Hand-written rather than `to_empty` + `reset_parameters` because: `to_empty` unties shared
    parameters (tied embeddings), Hugging Face layers have no `reset_parameters` (their model's
    `_init_weights` initialises them, rotary buffers included), and one unit must be initialised
    while its sub-units are already sharded.
    """
    owners = _hf_owners(root)
    fresh: dict[int, nn.Parameter] = {}
    uninitialized = set()
    for m in members:
        meta = False
        for name, p in m._parameters.items():
            if p is not None and p.is_meta:
                if id(p) not in fresh:
                    fresh[id(p)] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                m._parameters[name] = fresh[id(p)]
                meta = True
        for name, b in m._buffers.items():
            if b is not None and b.is_meta:
                m._buffers[name] = torch.empty_like(b, device=device)
                meta = True
        if not meta:
            continue
        with torch.no_grad():
            if owners.get(m) is not None:
                owners[m]._init_weights(m)
            elif callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
            else:
                uninitialized.add(type(m).__name__)
    if uninitialized:
        rank_zero_warn(f"no initialisation known for {sorted(uninitialized)} (no `reset_parameters`, not in a Hugging Face model): their tensors are uninitialised memory")


def _hf_owners(root: nn.Module) -> dict[nn.Module, nn.Module | None]:
    """For every module, the innermost Hugging Face model containing it (whose `_init_weights` applies)."""
    owners: dict[nn.Module, nn.Module | None] = {}

    def visit(m: nn.Module, owner: nn.Module | None) -> None:
        owner = m if _is_hf_model(m) else owner
        owners[m] = owner
        for child in m.children():
            visit(child, owner)

    visit(root, None)
    return owners
