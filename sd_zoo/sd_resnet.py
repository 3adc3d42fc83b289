"""Stochastic-depth ResNets: the CIFAR/SVHN family and the ImageNet bottleneck family.

Paper: `Deep Networks with Stochastic Depth` - https://arxiv.org/abs/1603.09382 (Huang et al., ECCV 2016).

The CIFAR/SVHN networks are the 6n+2-layer post-activation ResNets of He et al. (16/32/64 filters, option-A
shortcuts: 1x1 stride-2 average pooling then zero-padded channels, as in fb.resnet.torch and the authors'
Torch7 code). The ImageNet networks use timm's / torchvision's layer names, so their weights load strictly
from ``resnet50/101/152`` and evaluate to the same outputs.

Unlike a mask-multiply drop path, a residual block dropped in ``block`` mode does not run its branch at all:
the saving in training time is real. The rule itself lives in :mod:`sd_zoo.stochastic_depth`.
"""
import types
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Type, Union

import torch
import torch.fx
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, register_notrace_function
from timm.models._features import feature_take_indices
from timm.models.resnet import drop_blocks
from torch import nn
from torch._dynamo import maybe_mark_dynamic
from torch.utils.checkpoint import checkpoint

from .load_errors import explain_load_errors, verify_loaded_weights
from .stochastic_depth import GateScale, Schedule, StochasticDepth, track_scaling, zero_grads_for

__all__ = ['SDResNet', 'SDBasicBlock', 'SDBottleneck']

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
SVHN_MEAN = (0.4377, 0.4438, 0.4728)
SVHN_STD = (0.1980, 0.2010, 0.1970)

SCRIPTED_TRAINING_ERROR = (  # written out in _SDBlock._forward_scripted: TorchScript needs a literal there
    'an sd_ model in training mode with stochastic depth cannot run under TorchScript: its gates are drawn in '
    'Python each step. Use the eager model (or torch.compile) for training; script it in eval mode')


@register_notrace_function  # timm's fx tools, and torch.fx.wrap below for every other tracer
def gated_forward(block: '_SDBlock', x: torch.Tensor) -> torch.Tensor:
    """A training forward of ``block`` whose gate is drawn when it runs.

    fx records a call to this function instead of tracing into it, so a traced model draws its gates each step
    like the eager one instead of keeping the draw made while tracing.
    """
    scale = block.stochastic_depth.gate(block.sd_index, x, True)
    if block.grad_checkpointing and torch.is_grad_enabled() and not _is_dropped(scale):
        # the gate is an argument, so the recomputation in backward uses the same draw
        return checkpoint(block.combine, x, scale, use_reentrant=False)
    return block.combine(x, scale)


torch.fx.wrap('gated_forward')


# torch.compile of a model in block mode. The gates are drawn in Python and decide which code runs; traced, each
# draw, block index and scale would be a guard and a recompile. So the blocks run behind a graph break: the stem
# and the head are compiled, and the blocks run in one of two ways (``StochasticDepth.compile_blocks``):
#
# * 'regions' (default): kept blocks run as compiled regions, each a run of kept identity blocks of one signature
#   (:func:`_kept_run` over their :meth:`_SDBlock.kept_act`, the whole block, its last activation included; a
#   dropped identity block between them is the identity, so a stage's kept identity blocks form one run), cut into
#   runs of 8, 4, 2 and 1 blocks; a region is shared by every run of its length and signature (the scales are 0-d
#   tensors and it reads no block index, so no draw, block or scale value makes it recompile). Each (signature,
#   length) has its own copy of the code (dynamo keeps its compiled graphs per code object): at most four regions
#   per signature, compiled the first time a run of that length is kept, with static graphs for up to two batch
#   sizes (the batch, and an epoch's smaller last one) and one graph with a dynamic batch beyond them.
#   A run shares one call's fixed costs among its blocks (benchmarks/README.md, "torch.compile", attempts 9 and
#   14). The loop that calls the regions runs in frames dynamo skips for good (:func:`_skipped_frame`), so no
#   block costs a Python callback.
# * 'eager': the blocks run as in eager mode.
#
# Either way a dropped block runs :meth:`_SDBlock.skip` eagerly and its branch not at all.
#
# A ReLU whose output leaves a compiled graph is a pitfall: nothing in the graph saves that output, so the graph
# saves the ReLU's backward mask instead, as a bool tensor, and inductor's CPU code writes bool tensors about 20x
# slower than eager (torch 2.14; benchmarks/README.md, "torch.compile", attempts 5 and 12). A region's last ReLU is
# :class:`ReLUSignBackward`, whose backward multiplies by the sign of its output (no bool tensor anywhere); the
# stem's ReLU runs eagerly, in place, after the graph break. Inside a graph a ReLU's output feeds the next
# convolution, which saves it anyway, and no mask is made.

class ReLUSignBackward(torch.autograd.Function):
    """``relu(x)`` whose backward is ``grad * sign(relu(x))``: the gradient of ``torch.relu`` (0 where ``x <= 0``),
    computed from the saved output, so a compiled graph keeps no bool mask for it (see above)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.clamp_min(0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out, = ctx.saved_tensors
        return grad * out.sign()


REGION_STATIC_BATCHES = 2  # batch sizes a region compiles static graphs for; a third one gets a dynamic graph


class _Region:
    """The compiled region of a run of ``length`` kept blocks of one signature: its own copy of
    :func:`_kept_run`'s code, and the batch sizes it has compiled static graphs for."""

    def __init__(self, fn: Callable[..., torch.Tensor], name: str):
        self.fn = types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name)
        self.static_batches: Set[int] = set()
        self.batches_seen: Set[int] = set()  # every batch size it ran on (static or not)

    def mark_batch(self, x: torch.Tensor) -> None:
        """Static graphs for the first ``REGION_STATIC_BATCHES`` batch sizes (inductor's kernels for a known
        batch are faster), a dynamic batch for any other: at most four graphs per input shape and dtype (the
        dynamic one twice, for an input that is a view, the output of a dropped block, and one that is not)."""
        self.batches_seen.add(x.shape[0])
        if x.shape[0] in self.static_batches or len(self.static_batches) < REGION_STATIC_BATCHES:
            self.static_batches.add(x.shape[0])
            for t in (x, x._base):  # x is a view of its base after a dropped block (zero_grads_for)
                if t is not None:
                    torch._dynamo.mark_static(t, 0)
                    # a compiled graph with a dynamic batch (the stem's, once a second batch size came) stamps its
                    # outputs so that the next graph takes their batch as dynamic, and in torch 2.14 that stamp
                    # wins over mark_static: drop it (dynamo does not guard on it)
                    vars(t).pop('_dynamo_propagated_dynamic_indices', None)
        else:
            maybe_mark_dynamic(x, 0)


REGION_RUN_LENGTHS = (8, 4, 2, 1)  # a run of kept identity blocks is cut into compiled calls of these lengths
_REGIONS: Dict[Tuple[Any, ...], _Region] = {}  # by (block signature, run length)


def reset_compiled_regions() -> None:
    """Forget the regions and the batch sizes they were compiled for (call with ``torch._dynamo.reset()``; the
    next kept block compiles its region anew)."""
    _REGIONS.clear()


def region_key(block: '_SDBlock') -> Tuple[Any, ...]:
    """What makes blocks share a compiled region: their type, shortcut, and parameter shapes, dtypes and devices."""
    return type(block), block.downsample is None, tuple((p.shape, p.dtype, p.device) for p in block.parameters())


def _kept_run(blocks: Tuple['_SDBlock', ...], x: torch.Tensor, scales: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Kept blocks of one signature in a row, each whole (:meth:`_SDBlock.kept_act`): what a region compiles, one
    graph for the run, so the activations between its blocks stay inside it."""
    for block, scale in zip(blocks, scales):
        x = block.kept_act(x, scale)
    return x


@torch.compiler.disable  # bookkeeping in Python, not traced
def _region_for(block: '_SDBlock', x: torch.Tensor, length: int = 1) -> Callable[..., torch.Tensor]:
    """The compiled region that runs ``length`` kept blocks of ``block``'s signature on ``x``, with ``x``'s batch
    marked static or dynamic."""
    key = (region_key(block), length)
    region = _REGIONS.get(key)
    if region is None:
        region = _REGIONS[key] = _Region(_kept_run, f'kept_run_{length}_region_{len(_REGIONS)}')
    region.mark_batch(x)
    return region.fn


def compiled_gated_blocks(model: 'SDResNet', x: torch.Tensor) -> torch.Tensor:
    """The training forward of ``model``'s blocks under ``torch.compile``, from the stem's BatchNorm output (the
    stem's activation and pooling run eagerly): one graph break for all of them."""
    if model.stochastic_depth.compile_blocks == 'regions':
        return _regional_blocks(model, x)
    return _eager_blocks(model, x)


@torch.compiler.disable
def _eager_blocks(model: 'SDResNet', x: torch.Tensor) -> torch.Tensor:
    x = _eager_stem_out(model, x)
    for block in model.sd_blocks():
        x = gated_forward(block, x)
    return x


def _skipped_frame(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compiler.disable(fn, recursive=False)`` without its cost per call: ``fn``'s own frame runs eagerly and
    the frames it calls (the regions) are compiled, and a compiled caller breaks its graph at the call.

    ``disable(recursive=False)`` wraps ``fn``, and dynamo's Python callback runs on every call of it to find the
    wrapper on the stack (about 0.6 ms a call here, two dozen calls a step; benchmarks/README.md, "torch.compile",
    attempt 13). ``torch._dynamo.decorators.skip`` marks ``fn``'s code as skipped once, in dynamo's C frame
    evaluation, where it costs nothing per call; the older API stands in where a torch lacks it. Every Python
    function such a frame calls is offered to dynamo: helpers are skipped or disabled themselves."""
    try:
        from torch._dynamo.decorators import skip
    except ImportError:  # pragma: no cover - a torch without it
        return torch.compiler.disable(fn, recursive=False)
    return skip(fn)


_Call = Tuple[Tuple['_SDBlock', ...], Tuple[torch.Tensor, ...]]  # blocks in a row, and their scales (none: dropped)


@torch.compiler.disable
def _block_calls(model: 'SDResNet', x: torch.Tensor) -> List[_Call]:
    """This step's draw as the calls that run the gated blocks, in order: a dropped block alone with no scale;
    the kept identity blocks of one signature in a row, dropped identity blocks between them not counted (a stage's
    kept identity blocks up to its next downsampling block), cut into runs of :data:`REGION_RUN_LENGTHS` blocks,
    longest first; a kept downsampling block alone. All gates are drawn at the first (one draw per step), so
    ``x``, the blocks' input, serves them all: only its device and dtype are read."""
    calls: List[_Call] = []
    run: List[Tuple[_SDBlock, torch.Tensor]] = []
    run_key = None

    def flush() -> None:
        start = 0
        while start < len(run):
            n = next(n for n in REGION_RUN_LENGTHS if n <= len(run) - start)
            chunk = run[start:start + n]
            calls.append((tuple(b for b, _ in chunk), tuple(s for _, s in chunk)))
            start += n
        run.clear()

    for block in model.sd_blocks():
        scale = _eager_gate(block, x)
        if _is_dropped(scale):
            if block.downsample is not None:
                flush()
            # a dropped identity block's output is its input (tied to its parameters' zero gradients): the run goes
            # on past it, and its skip runs before the run's calls, which changes nothing they compute
            calls.append(((block,), ()))
        elif block.downsample is not None:
            flush()
            calls.append(((block,), (scale,)))
        else:
            key = region_key(block)
            if run and key != run_key:
                flush()
            run.append((block, scale))
            run_key = key
    flush()
    return calls


@_skipped_frame  # this frame runs eagerly; the frames it calls (the regions) are compiled
def _regional_blocks(model: 'SDResNet', x: torch.Tensor) -> torch.Tensor:
    x = _eager_stem_out(model, x)
    for blocks, scales in _block_calls(model, x):
        x = _run_region(blocks, x, scales) if scales else _eager_skip(blocks[0], x)
    return x


@_skipped_frame
def _run_region(blocks: Tuple['_SDBlock', ...], x: torch.Tensor, scales: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    region = _region_for(blocks[0], x, len(blocks))
    if blocks[0].grad_checkpointing and torch.is_grad_enabled():
        return checkpoint(region, blocks, x, scales, use_reentrant=False)
    return region(blocks, x, scales)


@_skipped_frame
def _regional_forward(block: '_SDBlock', x: torch.Tensor) -> torch.Tensor:
    scale = _eager_gate(block, x)
    if _is_dropped(scale):
        return _eager_skip(block, x)
    return _run_region((block,), x, (scale,))


def compiled_gated_forward(block: '_SDBlock', x: torch.Tensor) -> torch.Tensor:
    """One block's training forward under ``torch.compile`` (callers that run blocks one by one: timm's
    ``features_only`` models, ``forward_intermediates``), in the model's ``compile_blocks`` way."""
    if block.stochastic_depth.compile_blocks == 'regions':
        return _regional_forward(block, x)
    return _eager_block(block, x)


_eager_block = torch.compiler.disable(gated_forward)


@torch.compiler.disable
def _eager_gate(block: '_SDBlock', x: torch.Tensor) -> Union[float, torch.Tensor]:
    """0.0 for a dropped block, else its survivor scale as a 0-d tensor (not specialized on when compiled)."""
    sd = block.stochastic_depth
    scale = sd.gate(block.sd_index, x, True)
    return scale if _is_dropped(scale) else sd.scale_tensor(block.sd_index, x)


@torch.compiler.disable
def _eager_skip(block: '_SDBlock', x: torch.Tensor) -> torch.Tensor:
    return block.skip(x)


@torch.compiler.disable
def _eager_stem_out(model: 'SDResNet', x: torch.Tensor) -> torch.Tensor:
    return model.maxpool(model.act1(x))


class _SDBlock(nn.Module):
    """Gate handling shared by both block types: ``act(shortcut(x) + scale * branch(x))``."""

    def __init__(self, stochastic_depth: StochasticDepth, sd_index: int):
        super().__init__()
        self.stochastic_depth = stochastic_depth
        self.sd_index = sd_index
        self.grad_checkpointing = False
        # what TorchScript runs instead of the controller (set by __prepare_scriptable__)
        self.scripted_eval_scale = 1.0
        self.scripted_has_gates = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._forward_scripted(x)
        if self.training and self.stochastic_depth.is_active:
            if self.stochastic_depth.mode == 'block' and torch.compiler.is_compiling():
                return compiled_gated_forward(self, x)
            return gated_forward(self, x)
        return self.combine(x, self.stochastic_depth.gate(self.sd_index, x, self.training))

    def combine(self, x: torch.Tensor, scale: GateScale) -> torch.Tensor:
        if _is_dropped(scale):
            return self.skip(x)
        if isinstance(scale, torch.Tensor):  # a per-sample mask
            shortcut = x if self.downsample is None else self.downsample(x)
            return self.act_out(torch.addcmul(shortcut, self.branch(x), scale))
        return self.kept(x, scale)

    def kept(self, x: torch.Tensor, scale: Union[float, torch.Tensor]) -> torch.Tensor:
        """A kept block whose branch is scaled by one number: a float, or a 0-d tensor."""
        return self.act_out(self.kept_sum(x, scale))

    def kept_act(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """:meth:`kept` for ``torch.compile``'s regions (``compile_blocks='regions'``): ``scale`` is a 0-d tensor
        (not specialized on), and a ReLU is :class:`ReLUSignBackward` (no bool mask saved)."""
        x = self.kept_sum(x, scale)
        return ReLUSignBackward.apply(x) if type(self.act_out) is nn.ReLU else self.act_out(x)

    def kept_sum(self, x: torch.Tensor, scale: Union[float, torch.Tensor]) -> torch.Tensor:
        """``shortcut(x) + scale * branch(x)``, before the last activation (a 0-d tensor scale is not specialized on
        when compiled).

        The scale (1/p_l or p_l) is folded into the branch's last BatchNorm, so the sum is one in-place add, as in
        timm's blocks (BatchNorm's backward does not need its output): no new tensor, and no extra pass over the
        activations for the scale, neither forward nor backward."""
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.branch(x, scale).add_(shortcut)

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """The output of the dropped block: its branch is not computed."""
        if self.stochastic_depth.dropped_grad == 'zero':
            x = zero_grads_for(x, self.branch_parameters())
        if self.downsample is None:
            return x  # x is the output of a ReLU, so a dropped identity block is exactly x
        return self.act_out(self.downsample(x))

    def branch_parameters(self) -> List[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith('downsample.')]

    def _forward_scripted(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.scripted_has_gates:
            raise RuntimeError(
                'an sd_ model in training mode with stochastic depth cannot run under TorchScript: its gates are '
                'drawn in Python each step. Use the eager model (or torch.compile) for training; script it in eval '
                'mode')
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(x)
        return self.act_out(self.branch(x, 1.0 if self.training else self.scripted_eval_scale) + shortcut)

    def __prepare_scriptable__(self) -> nn.Module:
        # scripting a model still in training mode works (timm's validate.py scripts before .eval()); running
        # the scripted model in training mode raises SCRIPTED_TRAINING_ERROR
        sd = self.stochastic_depth
        self.scripted_eval_scale = float(sd.eval_scale(self.sd_index))
        self.scripted_has_gates = sd.is_active
        return self

    def branch(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """The residual branch, times ``scale``."""
        raise NotImplementedError

    def branch_norm(self) -> nn.BatchNorm2d:
        raise NotImplementedError


def scaled_norm(norm: nn.Module, x: torch.Tensor, scale: Union[float, torch.Tensor]) -> torch.Tensor:
    """``scale * norm(x)``; for an affine ``nn.BatchNorm2d`` the scale goes into its weight and bias instead.

    The batch statistics, the running-statistics update and the gradients are those of ``norm(x)``; only
    the affine parameters used in this call are ``scale * weight`` and ``scale * bias`` (C numbers). ``scale``
    may be a 0-d tensor (compiled block mode: a tensor is not specialized on).
    """
    if not isinstance(scale, torch.Tensor) and scale == 1.0:
        return norm(x)
    if type(norm) is not nn.BatchNorm2d or not norm.affine:
        return norm(x) * scale
    momentum = norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if momentum is None:  # cumulative moving average
            momentum = 1.0 / float(norm.num_batches_tracked)
    use_batch_stats = norm.training or norm.running_mean is None
    track = not norm.training or norm.track_running_stats
    return F.batch_norm(
        x, norm.running_mean if track else None, norm.running_var if track else None,
        norm.weight * scale, norm.bias * scale, use_batch_stats, momentum or 0.0, norm.eps)


def _is_dropped(scale: GateScale) -> bool:
    return isinstance(scale, float) and scale == 0.0


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 1x1 average pooling, then zero-pad the new channels (no parameters)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra_chs = out_chs - in_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, kernel_size=1, stride=self.stride)
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_chs))


class SDBasicBlock(_SDBlock):
    """conv3x3-BN-ReLU-conv3x3-BN, add, ReLU; option-A shortcut when the shape changes (CIFAR/SVHN)."""
    expansion = 1

    def __init__(
            self,
            inplanes: int,
            planes: int,
            stride: int,
            stochastic_depth: StochasticDepth,
            sd_index: int,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            drop_block: Optional[Type[nn.Module]] = None,
    ):
        super().__init__(stochastic_depth, sd_index)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(planes)
        self.drop_block = drop_block() if drop_block is not None else nn.Identity()  # where timm's BasicBlock has it
        self.act1 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.act_out = act_layer(inplace=True)
        reshape = stride != 1 or inplanes != planes
        self.downsample = PadShortcut(inplanes, planes, stride) if reshape else None

    def branch(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        x = self.conv2(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        if torch.jit.is_scripting():
            return self.bn2(x) if scale == 1.0 else self.bn2(x) * scale
        return scaled_norm(self.bn2, x, scale)

    def branch_norm(self) -> nn.BatchNorm2d:
        return self.bn2


class SDBottleneck(_SDBlock):
    """1x1-3x3-1x1 bottleneck, stride on the 3x3, projection shortcut when the shape changes (ImageNet)."""
    expansion = 4

    def __init__(
            self,
            inplanes: int,
            planes: int,
            stride: int,
            stochastic_depth: StochasticDepth,
            sd_index: int,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            drop_block: Optional[Type[nn.Module]] = None,
    ):
        super().__init__(stochastic_depth, sd_index)
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.act1 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.drop_block = drop_block() if drop_block is not None else nn.Identity()  # where timm's Bottleneck has it
        self.act2 = act_layer(inplace=True)
        self.conv3 = nn.Conv2d(planes, outplanes, 1, bias=False)
        self.bn3 = norm_layer(outplanes)
        self.act_out = act_layer(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != outplanes:
            # 'downsample.0' / 'downsample.1': the key names of timm's and torchvision's weights
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False), norm_layer(outplanes))

    def branch(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.conv3(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        if torch.jit.is_scripting():
            return self.bn3(x) if scale == 1.0 else self.bn3(x) * scale
        return scaled_norm(self.bn3, x, scale)

    def branch_norm(self) -> nn.BatchNorm2d:
        return self.bn3


BlockType = Type[Union[SDBasicBlock, SDBottleneck]]


def make_stages(
        block: BlockType,
        layers: Sequence[int],
        channels: Sequence[int],
        inplanes: int,
        stochastic_depth: StochasticDepth,
        reduction: int,
        drop_block_rate: float = 0.0,
        **block_kwargs: Any,
) -> Tuple[List[Tuple[str, nn.Sequential]], List[Dict[str, Any]]]:
    """Build ``layer1..layerN``, numbering the blocks for the stochastic-depth schedule.

    DropBlock goes where timm's ResNet puts it (``timm.models.resnet.drop_blocks``: the third and fourth stage).
    """
    stages, feature_info, sd_index = [], [], 0
    stage_args = zip(layers, channels, drop_blocks(drop_block_rate))
    for stage_idx, (num_blocks, planes, drop_block) in enumerate(stage_args):
        stride = 1 if stage_idx == 0 else 2
        reduction *= stride
        blocks = []
        for block_idx in range(num_blocks):
            blocks.append(block(
                inplanes, planes, stride if block_idx == 0 else 1, stochastic_depth, sd_index,
                drop_block=drop_block, **block_kwargs))
            inplanes, sd_index = planes * block.expansion, sd_index + 1
        name = f'layer{stage_idx + 1}'
        stages.append((name, nn.Sequential(*blocks)))
        feature_info.append(dict(num_chs=inplanes, reduction=reduction, module=name))
    return stages, feature_info


# timm ResNet arguments without an equivalent here, with the value that means "not used"
_TIMM_RESNET_DEFAULTS = dict(
    output_stride=32, cardinality=1, base_width=64, stem_width=64, stem_type='', replace_stem_pool=False,
    block_reduce_first=1, down_kernel_size=1, avg_down=False, aa_layer=None, block_args=None)


def _check_timm_resnet_args(kwargs: Dict[str, Any]) -> None:
    """Accept timm ResNet arguments at their neutral value; name any other argument in the error."""
    for name, value in kwargs.items():
        if name not in _TIMM_RESNET_DEFAULTS:
            raise TypeError(f"SDResNet got an unexpected keyword argument {name!r}")
        if value != _TIMM_RESNET_DEFAULTS[name] and not (name == 'block_args' and value == {}):
            raise ValueError(
                f"{name}={value!r} is not supported by sd_ models (timm's ResNet option; here only "
                f"{name}={_TIMM_RESNET_DEFAULTS[name]!r}, the plain ResNet of the paper)")


class SDResNet(nn.Module):
    """ResNet whose residual blocks follow one stochastic-depth schedule.

    Args:
        block: residual block type.
        layers: number of blocks per stage.
        channels: branch width of each stage (bottleneck: before expansion).
        cifar_stem: 3x3 stride-1 stem without max pooling (32x32 inputs) instead of ImageNet's 7x7/2 + pool.
        num_classes, in_chans, global_pool, drop_rate: as in timm.
        drop_path_rate: 1 - p_L, drop probability of the last block (the paper's default 0.5).
        drop_path_schedule: ``'linear'``, ``'uniform'`` or L survival probabilities.
        drop_path_mode: ``'block'``, ``'sample'`` or ``'off'``.
        drop_path_scaling: ``'train'`` (inverted) or ``'test'`` (the paper's).
        drop_path_seed: seed of the gate generator (see :class:`StochasticDepth`).
        drop_path_grad: ``'zero'`` (default): a dropped block's parameters get a zero gradient, so plain DDP
            works and they get weight decay and momentum as in the paper's code; ``'none'``: their ``grad`` stays
            ``None`` (DDP then needs ``find_unused_parameters=True``).
        drop_block_rate: DropBlock in the third and fourth stage, as in timm's ResNet.
        bn_momentum, bn_eps: BatchNorm settings (timm's ``train.py --bn-momentum/--bn-eps``).
        zero_init_last: zero the last BatchNorm of each branch at init (timm's default; it keeps an untrained
            1202-layer net finite in eval). ``False`` gives the paper's He initialisation.
    """

    def __init__(
            self,
            block: BlockType,
            layers: Sequence[int],
            channels: Sequence[int] = (64, 128, 256, 512),
            cifar_stem: bool = False,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.5,
            drop_path_schedule: Schedule = 'linear',
            drop_path_mode: str = 'block',
            drop_path_scaling: str = 'train',
            drop_path_seed: Optional[int] = None,
            drop_path_grad: str = 'zero',
            drop_block_rate: float = 0.0,
            bn_momentum: Optional[float] = None,
            bn_eps: Optional[float] = None,
            zero_init_last: bool = True,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device: Optional[Union[str, torch.device]] = None,
            dtype: Optional[torch.dtype] = None,
            **timm_resnet_args: Any,
    ):
        super().__init__()
        _check_timm_resnet_args(timm_resnet_args)
        if not 1 <= len(layers) <= 4:
            raise ValueError(f'layers={tuple(layers)!r}: SDResNet has 1 to 4 stages')
        norm_args = {k: v for k, v in (('momentum', bn_momentum), ('eps', bn_eps)) if v is not None}
        norm_layer = partial(norm_layer, **norm_args) if norm_args else norm_layer
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.stochastic_depth = StochasticDepth(
            sum(layers), drop_path_rate, drop_path_schedule, drop_path_mode, drop_path_scaling, drop_path_seed,
            drop_path_grad)

        # Stem
        inplanes = channels[0] if cifar_stem else 64
        if cifar_stem:
            self.conv1 = nn.Conv2d(in_chans, inplanes, 3, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_chans, inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(inplanes)
        self.act1 = act_layer(inplace=True)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.feature_info = [dict(num_chs=inplanes, reduction=1 if cifar_stem else 2, module='act1')]

        # Stages
        stages, stage_info = make_stages(
            block, layers, channels, inplanes, self.stochastic_depth, 1 if cifar_stem else 4,
            drop_block_rate=drop_block_rate, act_layer=act_layer, norm_layer=norm_layer)
        for name, stage in stages:
            self.add_module(name, stage)
        self.stage_names = tuple(name for name, _ in stages)
        self.feature_info.extend(stage_info)

        # Head
        self.num_features = self.head_hidden_size = stage_info[-1]['num_chs']
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.init_weights(zero_init_last)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = True) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        if zero_init_last:
            for block in self.sd_blocks():
                nn.init.zeros_(block.branch_norm().weight)

    def sd_blocks(self) -> Iterator[_SDBlock]:
        """The residual blocks in schedule order (input side first)."""
        for name in self.stage_names:
            yield from getattr(self, name)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, str]:
        return dict(stem=r'^conv1|bn1|maxpool', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for block in self.sd_blocks():
            block.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        like = self.conv1.weight
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.fc.to(device=like.device, dtype=like.dtype).train(self.training)
        self.global_pool.train(self.training)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features of the stem (index 0) and of each stage (1..N), as in timm's ResNet."""
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt={output_fmt!r} is not supported: SDResNet features are 'NCHW'")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        x = self.act1(self.bn1(self.conv1(x)))
        intermediates = [x] if 0 in take_indices else []
        x = self.maxpool(x)
        stage_names = self.stage_names[:max_index] if stop_early else self.stage_names
        for feat_idx, name in enumerate(stage_names, start=1):
            x = getattr(self, name)(x)
            if feat_idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        for name in self.stage_names[max_index:]:
            setattr(self, name, nn.Sequential())
        if max_index < len(self.stage_names):
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or max_index < len(self.stage_names):
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        if torch.jit.is_scripting():
            return self._stages_scripted(self.maxpool(self.act1(x)))
        sd = self.stochastic_depth
        if self.training and sd.is_active and sd.mode == 'block' and torch.compiler.is_compiling():
            return compiled_gated_blocks(self, x)  # one graph break for the stem's activation and all blocks
        x = self.maxpool(self.act1(x))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x

    def _stages_scripted(self, x: torch.Tensor) -> torch.Tensor:
        # TorchScript cannot look stages up by a name held in a variable; hasattr is resolved when scripting
        x = self.layer1(x)
        if hasattr(self, 'layer2'):
            x = self.layer2(x)
        if hasattr(self, 'layer3'):
            x = self.layer3(x)
        if hasattr(self, 'layer4'):
            x = self.layer4(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_sd_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> SDResNet:
    feature_cfg = dict(out_indices=(0, 1, 2, 3)) if kwargs.get('cifar_stem') else None
    tag = kwargs.get('pretrained_cfg')
    with explain_load_errors(f'{variant}.{tag}' if isinstance(tag, str) and tag else variant):
        model = build_model_with_cfg(SDResNet, variant, pretrained, feature_cfg=feature_cfg, **kwargs)
    if pretrained:
        verify_loaded_weights(model)  # the file's sha256 against the one recorded at export (or the Hub blob's name)
    return track_scaling(model) if hasattr(model, 'stochastic_depth') else model  # features_only: no state of it


def _cifar_args(n: int) -> Dict[str, Any]:
    """6n+2 layers: three stages of n basic blocks with 16/32/64 filters."""
    return dict(block=SDBasicBlock, layers=(n, n, n), channels=(16, 32, 64), cifar_stem=True)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        'license': 'apache-2.0', 'paper_ids': 'arXiv:1603.09382',
        'paper_name': 'Deep Networks with Stochastic Depth',
        **kwargs,
    }


def _cifar_cfg(**kwargs: Any) -> Dict[str, Any]:
    return _cfg(**{
        'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (8, 8), 'crop_pct': 1.0,
        'mean': CIFAR10_MEAN, 'std': CIFAR10_STD, **kwargs})


# The architectures' untrained cfgs; sd_zoo/pretrained.py adds the published weights as tags on import.
default_cfgs = generate_default_cfgs({
    'sd_resnet20_cifar': _cifar_cfg(),
    'sd_resnet32_cifar': _cifar_cfg(),
    'sd_resnet44_cifar': _cifar_cfg(),
    'sd_resnet56_cifar': _cifar_cfg(),
    'sd_resnet110_cifar': _cifar_cfg(),
    'sd_resnet1202_cifar': _cifar_cfg(),
    'sd_resnet152_svhn': _cifar_cfg(mean=SVHN_MEAN, std=SVHN_STD),
    'sd_resnet50': _cfg(),
    'sd_resnet101': _cfg(),
    'sd_resnet152': _cfg(),
})


@register_model
def sd_resnet20_cifar(pretrained: bool = False, **kwargs: Any) -> SDResNet:
    """ResNet-20 for 32x32 inputs (n = 3, 9 residual blocks) with stochastic depth."""
    return _create_sd_resnet('sd_resnet20_cifar', pretrained, **dict(_cifar_args(3), **kwargs))


@register_model
def sd_resnet32_cifar(pretrained: bool = False, **kwargs: Any) -> SDResNet:
    """ResNet-32 for 32x32 inputs (n = 5, 15 residual blocks) with stochastic depth."""
    return _create_sd_resnet('sd_resnet32_cifar', pretrained, **dict(_cifar_args(5), **kwargs))


@register_model
def sd_resnet44_cifar(pretrained: bool = False, **kwargs: Any) -> SDResNet:
    """ResNet-44 for 32x32 inputs (n = 7, 21 residual blocks) with stochastic depth."""
    return _create_sd_resnet('sd_resnet44_cifar', pretrained, **dict(_cifar_args(7), **kwargs))


@register_model
def sd_resnet56_cifar(pretrained: bool = False, **kwargs: Any) -> SDResNet:
    """ResNet-56 for 32x32 inputs (n = 9, 27 residual blocks) with stochastic depth."""
    return _create_sd_resnet('sd_resnet56_cifar', pretrained, **dict(_cifar_args(9), **kwargs))


@register_model
def sd_resnet110_cifar(pretrained: bool = False, **kwargs: Any) -> SDResNet:
    """ResNet-110 for 32x32 inputs (n = 18, 54 residual blocks): the paper's CIFAR network."""
    return _create_sd_resnet('sd_resnet110_cifar', pretrained, **dict(_cifar_args(18), **kwargs))


@register_model
def sd_resnet1202_cifar(pretrained: bool = False, **kwargs: Any) -> SDResNet:
    """ResNet-1202 for 32x32 inputs (n = 200, 600 residual blocks): the paper's deepest network."""
    return _create_sd_resnet('sd_resnet1202_cifar', pretrained, **dict(_cifar_args(200), **kwargs))


@register_model
def sd_resnet152_svhn(pretrained: bool = False, **kwargs: Any) -> SDResNet:
    """ResNet-152 for 32x32 SVHN digits (n = 25, 75 basic blocks): the paper's SVHN network."""
    return _create_sd_resnet('sd_resnet152_svhn', pretrained, **dict(_cifar_args(25), **kwargs))


@register_model
def sd_resnet50(pretrained: bool = False, **kwargs: Any) -> SDResNet:
    """ResNet-50 (bottleneck [3, 4, 6, 3]) with stochastic depth; weights interchangeable with timm's."""
    return _create_sd_resnet('sd_resnet50', pretrained, **dict(block=SDBottleneck, layers=(3, 4, 6, 3), **kwargs))


@register_model
def sd_resnet101(pretrained: bool = False, **kwargs: Any) -> SDResNet:
    """ResNet-101 (bottleneck [3, 4, 23, 3]) with stochastic depth; weights interchangeable with timm's."""
    return _create_sd_resnet('sd_resnet101', pretrained, **dict(block=SDBottleneck, layers=(3, 4, 23, 3), **kwargs))


@register_model
def sd_resnet152(pretrained: bool = False, **kwargs: Any) -> SDResNet:
    """ResNet-152 (bottleneck [3, 8, 36, 3]) with stochastic depth: the paper's ImageNet network."""
    return _create_sd_resnet('sd_resnet152', pretrained, **dict(block=SDBottleneck, layers=(3, 8, 36, 3), **kwargs))
