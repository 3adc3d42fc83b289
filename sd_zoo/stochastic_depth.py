"""Stochastic depth (Huang et al., ECCV 2016, arXiv:1603.09382): the rule, defined once.

Every `sd_` model owns one :class:`StochasticDepth` controller that all its residual blocks share. It holds
the per-block survival probabilities p_l, draws the gates from a generator of its own and tells each block
how to combine its residual branch with the shortcut:

* ``scale == 0.0``: the block is dropped, its branch is not computed at all (block mode, training);
* a float: ``shortcut + scale * branch`` (1.0 for the plain ResNet, 1/p_l or p_l for the two scalings);
* a tensor of shape (B, 1, 1, 1): a per-sample mask (sample mode, training).

All gates of a forward pass come from a single draw, made when the first block asks for its gate, so
gradient checkpointing (which passes the gate explicitly) sees the same drops.

Distributed training: in block mode every rank must drop the same blocks (a block kept on k of N ranks would
get its gradient scaled by k/N). The first draw made while a process group exists broadcasts rank 0's gate
generator state to all ranks, so they agree whatever each rank seeded (timm's ``train.py`` seeds torch with
``seed + rank``). The parameters of a dropped block get an exact zero gradient by default
(``dropped_grad='zero'``), so plain ``DistributedDataParallel`` (``find_unused_parameters=False``) works and the
optimizer applies weight decay and momentum to them, as the authors' code did; ``dropped_grad='none'`` leaves
their ``grad`` at ``None`` (DDP then needs ``find_unused_parameters=True``).
"""
import math
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    'MODES', 'SCALINGS', 'SCHEDULES', 'COMPILE_BLOCKS', 'Schedule', 'GateScale', 'StochasticDepth',
    'survival_probabilities', 'fold_test_scaling', 'zero_grads_for', 'track_scaling', 'SCALING_KEY',
]

MODES = ('block', 'sample', 'off')
SCALINGS = ('train', 'test')
SCHEDULES = ('linear', 'uniform')
DROPPED_GRADS = ('zero', 'none')
COMPILE_BLOCKS = ('regions', 'eager')

Schedule = Union[str, Sequence[float]]
GateScale = Union[float, torch.Tensor]


def survival_probabilities(
        num_blocks: int,
        drop_path_rate: float = 0.5,
        schedule: Schedule = 'linear',
) -> List[float]:
    """Survival probability p_l of each of ``num_blocks`` residual blocks, input side first.

    ``drop_path_rate`` is 1 - p_L, the drop probability of the last block. ``linear`` is the paper's rule
    p_l = 1 - (l / L) (1 - p_L) for l = 1..L (the first block is dropped too); ``uniform`` gives every
    block p_L; a sequence gives the L probabilities explicitly and ``drop_path_rate`` is then ignored.
    """
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(
                f"drop_path_schedule={schedule!r} is unknown: use one of {SCHEDULES} "
                f"or a sequence of {num_blocks} survival probabilities in (0, 1]")
        if isinstance(drop_path_rate, bool) or not isinstance(drop_path_rate, (int, float)):
            raise ValueError(f"drop_path_rate={drop_path_rate!r} must be a number (a float in [0, 1)), not "
                            f"{type(drop_path_rate).__name__}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(
                f"drop_path_rate={drop_path_rate!r} is out of range: it is 1 - p_L, the drop probability of "
                f"the last block, and must lie in [0, 1) (0 gives constant depth, the paper uses 0.5)")
        if schedule == 'uniform':
            return [1.0 - float(drop_path_rate)] * num_blocks
        return [1.0 - (idx / num_blocks) * float(drop_path_rate) for idx in range(1, num_blocks + 1)]

    probs = [float(p) for p in schedule]
    if len(probs) != num_blocks:
        raise ValueError(
            f"drop_path_schedule has {len(probs)} survival probabilities but the model has {num_blocks} "
            f"residual blocks: give exactly {num_blocks} values in (0, 1], input side first")
    bad = [p for p in probs if not (0.0 < p <= 1.0) or math.isnan(p)]
    if bad:
        raise ValueError(
            f"drop_path_schedule holds survival probabilities outside (0, 1]: {bad[:5]}; "
            f"each value is the probability that a block is kept, so 0 < p <= 1")
    return probs


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is unknown: use one of {tuple(allowed)}")
    return value


class StochasticDepth:
    """Survival schedule, gate generator and combine rule shared by the blocks of one network.

    Args:
        num_blocks: number of residual blocks L.
        drop_path_rate: 1 - p_L, in [0, 1).
        schedule: ``'linear'`` (paper), ``'uniform'`` or a sequence of L survival probabilities.
        mode: ``'block'`` (one draw per block per forward, dropped branches are skipped), ``'sample'``
            (per-sample mask, branch always computed, one static graph) or ``'off'``.
        scaling: ``'train'`` (inverted: survivors scaled by 1/p_l in training, eval is the plain ResNet)
            or ``'test'`` (the paper's: branch scaled by p_l at eval).
        seed: seed of the gate generator; ``None`` draws one from torch's global generator, so that
            ``torch.manual_seed`` before model creation makes the drop sequence reproducible.
        dropped_grad: ``'zero'`` (a dropped block's parameters get a zero gradient) or ``'none'`` (their
            ``grad`` stays ``None``); block mode only.

    ``agree_across_ranks`` (default True): in block mode, the first draw after a process group exists (and the
    first after :meth:`manual_seed` or :meth:`load_state_dict`) broadcasts rank 0's generator state. That draw
    is a collective: every rank of the default group must run the training forward, as under DDP.
    """

    def __init__(
            self,
            num_blocks: int,
            drop_path_rate: float = 0.5,
            schedule: Schedule = 'linear',
            mode: str = 'block',
            scaling: str = 'train',
            seed: Optional[int] = None,
            dropped_grad: str = 'zero',
    ):
        self.mode = _check_choice('drop_path_mode', mode, MODES)
        self.dropped_grad = _check_choice('drop_path_grad', dropped_grad, DROPPED_GRADS)
        self.agree_across_ranks = True
        self._ranks_agree = False
        self.scaling = _check_choice('drop_path_scaling', scaling, SCALINGS)
        self.survival = survival_probabilities(num_blocks, drop_path_rate, schedule)
        # the arguments as given, so that an export can rebuild exactly this schedule
        self.drop_path_rate = float(drop_path_rate) if isinstance(schedule, str) else 0.0
        self.schedule: Schedule = schedule if isinstance(schedule, str) else list(self.survival)
        self.generator = torch.Generator()
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2 ** 63 <= seed < 2 ** 64):
            raise ValueError(f'drop_path_seed={seed!r} must be an integer in [-2**63, 2**64) or None (drawn from '
                             f"torch's global generator)")
        self.manual_seed(int(torch.randint(2 ** 62, (1,), device='cpu').item()) if seed is None else seed)
        self.last_active: Optional[List[bool]] = None
        self._scales: List[GateScale] = []
        self._scale_tensors: Dict[Any, List[torch.Tensor]] = {}
        self.compile_blocks = 'regions'
        self._cursor = num_blocks

    @property
    def compile_blocks(self) -> str:
        """How the blocks run under ``torch.compile`` in block mode: ``'regions'`` (default) or ``'eager'``.

        Either way the gates stay in Python behind one graph break, so no draw, block index or scale value makes
        dynamo recompile, and a dropped block's branch is not run; ``'regions'`` compiles runs of a stage's kept
        blocks of one shape (8, 4, 2 or 1 blocks) as regions shared by all runs of that length and shape (at
        most four compiles per block shape), ``'eager'`` runs the gated blocks
        eagerly (the stem and head are compiled). See the README's recommendation per situation.
        """
        return self._compile_blocks

    @compile_blocks.setter
    def compile_blocks(self, value: str) -> None:
        self._compile_blocks = _check_choice('compile_blocks', value, COMPILE_BLOCKS)

    @property
    def num_blocks(self) -> int:
        return len(self.survival)

    @property
    def expected_depth(self) -> float:
        """Expected number of residual blocks that run in a training step: sum of p_l."""
        return math.fsum(self.survival)

    @property
    def is_active(self) -> bool:
        """Whether training draws gates at all (a mode other than off and some p_l < 1)."""
        return self.mode != 'off' and any(p < 1.0 for p in self.survival)

    def manual_seed(self, seed: int) -> 'StochasticDepth':
        """Seed the gate generator; ranks seeded alike drop the same blocks."""
        self.generator.manual_seed(seed)
        self._cursor = self.num_blocks
        self._ranks_agree = False
        return self

    def state_dict(self) -> Dict[str, Any]:
        """Generator state and position, for exact resume (``Accelerator.register_for_checkpointing``)."""
        return {'generator': self.generator.get_state(), 'last_active': self.last_active}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.generator.set_state(state['generator'])
        self.last_active = state['last_active']
        self._cursor = self.num_blocks
        self._ranks_agree = False

    def eval_scale(self, index: int) -> float:
        """The factor of block ``index``'s branch in evaluation: p_l in test scaling, else 1."""
        return self.survival[index] if self.scaling == 'test' and self.mode != 'off' else 1.0

    def gate(self, index: int, x: torch.Tensor, training: bool) -> GateScale:
        """How block ``index`` combines its branch with the shortcut for input ``x`` (see module doc)."""
        if not training:
            return self.eval_scale(index)
        if not self.is_active:
            return 1.0
        if self.mode == 'sample' and torch.compiler.is_compiling():
            return self._traced_sample_mask(index, x)
        if index <= self._cursor:  # a new forward pass began: one draw for all blocks
            self._draw(x)
        self._cursor = index
        return self._scales[index]

    def scale_tensor(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Block ``index``'s survivor scale (1/p_l in train scaling, else 1) as a 0-d tensor like ``x``, made
        once per device and dtype: what a compiled region takes instead of a float it would specialize on."""
        key = (x.device, x.dtype, self.scaling)  # fold_test_scaling may change the scaling
        if key not in self._scale_tensors:
            inverse = self.scaling == 'train'
            self._scale_tensors[key] = [torch.tensor(1.0 / p if inverse else 1.0, dtype=x.dtype, device=x.device)
                                        for p in self.survival]
        return self._scale_tensors[key][index]

    def _draw(self, x: torch.Tensor) -> None:
        probs = torch.tensor(self.survival, dtype=torch.float64)
        inverse = self.scaling == 'train'
        if self.mode == 'block':
            if self.agree_across_ranks and not self._ranks_agree:
                self._agree_across_ranks(x.device)
            keep = (torch.rand(self.num_blocks, generator=self.generator, dtype=torch.float64) < probs).tolist()
            self.last_active = keep
            self._scales = [(1.0 / p if inverse else 1.0) if k else 0.0 for k, p in zip(keep, self.survival)]
            return
        batch = x.shape[0]
        keep = torch.rand(self.num_blocks, batch, generator=self.generator, dtype=torch.float64) < probs[:, None]
        masks = keep.to(torch.float64) / probs[:, None] if inverse else keep.to(torch.float64)
        masks = masks.to(device=x.device, dtype=x.dtype, non_blocking=True).view(self.num_blocks, batch, 1, 1, 1)
        self.last_active = keep.any(dim=1).tolist()
        self._scales = list(masks.unbind(0))

    @torch.compiler.disable
    def _agree_across_ranks(self, device: torch.device) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            return  # no group yet: agree at the first draw after one exists
        if dist.get_world_size() > 1:
            state = self.generator.get_state().to(device)
            dist.broadcast(state, src=0)
            self.generator.set_state(state.cpu())
        self._ranks_agree = True

    def _traced_sample_mask(self, index: int, x: torch.Tensor) -> torch.Tensor:
        # torch.compile cannot trace a torch.Generator: inside a compiled graph the per-sample masks come
        # from torch's own (device) RNG, which keeps sample mode a single graph.
        p = self.survival[index]
        mask = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(p)
        return mask / p if self.scaling == 'train' else mask

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(num_blocks={self.num_blocks}, mode={self.mode!r}, '
                f'scaling={self.scaling!r}, expected_depth={self.expected_depth:.2f})')


class _ZeroGradsFor(torch.autograd.Function):
    """Identity on ``x`` whose backward also gives each of ``params`` a zero gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.params = params
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (grad, *(torch.zeros_like(p) for p in ctx.params))


def zero_grads_for(x: torch.Tensor, params: Sequence[nn.Parameter]) -> torch.Tensor:
    """``x``, tied into autograd with ``params`` so that backward gives each of them an exact zero gradient.

    Costs no pass over ``x`` (the result is a view of it, and must not be modified in place) and one zero
    tensor per parameter in backward: a dropped block's parameters then take part in every step, as plain
    DistributedDataParallel requires, without their branch being computed.
    """
    params = [p for p in params if p.requires_grad]
    if not params or not torch.is_grad_enabled():
        return x
    return _ZeroGradsFor.apply(x, *params)


def fold_test_scaling(model: nn.Module) -> nn.Module:
    """Turn a ``test``-scaled model into ``train`` scaling in place, with unchanged eval outputs.

    Test scaling evaluates ``shortcut + p_l * branch``; the branch ends in a BatchNorm, whose affine
    weight and bias absorb p_l exactly, so the plain ResNet (inverted scaling) computes the same function.
    """
    sd: StochasticDepth = model.stochastic_depth
    if sd.scaling == 'train':
        return model
    folded = sd.survival if sd.mode != 'off' else [1.0] * sd.num_blocks  # off evaluates the plain ResNet
    with torch.no_grad():
        for block, p in zip(model.sd_blocks(), folded):
            norm = block.branch_norm()
            norm.weight.mul_(p)
            norm.bias.mul_(p)
    sd.scaling = 'train'
    return model


# The state dict of a test-scaled model is not that of a plain ResNet (its eval output scales each branch by p_l):
# it carries this key, and a model in the other scaling refuses it instead of computing something else.
SCALING_KEY = 'drop_path_scaling_test'


def _add_scaling_key(model: nn.Module, state: Dict[str, Any], prefix: str, local_metadata: Any) -> None:
    if model.stochastic_depth.scaling == 'test':
        state[prefix + SCALING_KEY] = torch.ones(())


def _check_scaling_key(model: nn.Module, state: Dict[str, Any], prefix: str, *args: Any) -> None:
    marked = state.pop(prefix + SCALING_KEY, None) is not None
    if marked and model.stochastic_depth.scaling != 'test':
        raise ValueError(
            "this state dict is of a drop_path_scaling='test' model (branches scaled by p_l at eval), and this "
            "model uses 'train' scaling: loading it would change the outputs. Create the model with "
            "drop_path_scaling='test', or fold the source first (sd_zoo.stochastic_depth.fold_test_scaling, as "
            "sd-zoo-export does)")


def track_scaling(model: nn.Module) -> nn.Module:
    """Make ``model``'s state dict say when it is in test scaling, and refuse such a state dict in train scaling.

    A state dict without the key (a train-scaled model's, timm's, or one written before the key existed) loads as
    before; timm's plain ResNet refuses a test-scaled one (unexpected key ``drop_path_scaling_test``).
    """
    model._register_state_dict_hook(_add_scaling_key)
    model._register_load_state_dict_pre_hook(_check_scaling_key, with_module=True)
    return model
