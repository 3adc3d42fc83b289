"""The models under timm's own tools and plain PyTorch: DDP, fx tracing, TorchScript, timm's ResNet arguments.

timm's ``train.py`` wraps a model in plain DDP after seeding each rank with ``seed + rank``, its fx feature
extraction traces the model, ``--torchscript`` scripts it, and its model tests expect a gradient for every
parameter. These tests check each of those uses on the registry.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import timm
import torch
from timm.layers import DropBlock2d
from torch import nn

import sd_zoo  # noqa: F401  (registers the models)
from sd_zoo.sd_resnet import SCRIPTED_TRAINING_ERROR, _SDBlock

ROOT = Path(__file__).resolve().parents[1]
MODELS = timm.list_models('sd_*')
HEAVY = {'sd_resnet1202_cifar', 'sd_resnet152', 'sd_resnet101'}
REGISTRY = [pytest.param(m, marks=pytest.mark.slow) if m in HEAVY else m for m in MODELS]
# TorchScript compiles every block: 10-70 s per model on a loaded 2-core machine, so only ResNet-20 by default
# sd_resnet1202_cifar is left out: untrained, with BatchNorm running statistics at their init, its eval output
# overflows to inf/NaN in fp32 (eager as well), so there is nothing to compare; its blocks are those of the others.
SCRIPTED = [m if m == 'sd_resnet20_cifar' else pytest.param(m, marks=pytest.mark.slow)
            for m in MODELS if m != 'sd_resnet1202_cifar']


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second OpenMP thread only spins (about 50x the CPU time on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_input(model: nn.Module, batch: int = 2) -> torch.Tensor:
    chans, height, _ = model.pretrained_cfg['input_size']
    size = 16 if height == 32 else 64
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(0))


def controller(module: nn.Module):
    """The stochastic-depth controller of any wrapper (GraphModule, FeatureGraphNet) around sd_ blocks."""
    return next(m for m in module.modules() if isinstance(m, _SDBlock)).stochastic_depth


def blocks(module: nn.Module) -> List[_SDBlock]:
    return [m for m in module.modules() if isinstance(m, _SDBlock)]


def train_steps(model: nn.Module, steps: int, loss=lambda out: out.square().mean()):
    """Run ``steps`` forward/backward passes; return the draws and each block's summed |gradient|."""
    sd, draws = controller(model), []
    grad_sums = {id(b): 0.0 for b in blocks(model)}
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        loss(model(x)).backward()
        draws.append(tuple(sd.last_active))
        for b in blocks(model):
            grad_sums[id(b)] += sum(float(p.grad.abs().sum()) for p in b.branch_parameters())
    return draws, grad_sums


# --------------------------------------------------------------------------------------------- gradients

@pytest.mark.parametrize('name', REGISTRY)
def test_every_parameter_gets_a_gradient_in_a_block_mode_step(name):
    model = timm.create_model(name, drop_path_rate=0.9, drop_path_seed=3, zero_init_last=False).train()
    model(small_input(model)).mean().backward()
    active = model.stochastic_depth.last_active
    assert not all(active), 'no block dropped: the test would not exercise dropped blocks'
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing[:5]
    for block, kept in zip(model.sd_blocks(), active):
        if not kept:
            assert all(not p.grad.any() for p in block.branch_parameters()), 'a dropped block got a non-zero grad'


def test_grad_none_semantics_stay_available():
    model = timm.create_model('sd_resnet20_cifar', drop_path_rate=0.9, drop_path_seed=3,
                              drop_path_grad='none').train()
    model(small_input(model)).mean().backward()
    for block, kept in zip(model.sd_blocks(), model.stochastic_depth.last_active):
        assert (block.conv1.weight.grad is None) == (not kept)
    with pytest.raises(ValueError, match='drop_path_grad'):
        timm.create_model('sd_resnet20_cifar', drop_path_grad='zeros')


def test_dropped_blocks_get_weight_decay_and_momentum():
    model = timm.create_model('sd_resnet20_cifar', drop_path_rate=0.9, drop_path_seed=3).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    model(small_input(model)).mean().backward()
    opt.step()
    dropped = [i for i, kept in enumerate(model.stochastic_depth.last_active) if not kept]
    name = f'layer{dropped[0] // 3 + 1}.{dropped[0] % 3}.conv1.weight'
    param = dict(model.named_parameters())[name]
    torch.testing.assert_close(param.detach(), before[name] * (1 - 0.1 * 0.01), rtol=0, atol=1e-7)
    assert 'momentum_buffer' in opt.state[param]


# --------------------------------------------------------------------------------------------- DDP

DDP_WORKER = '''
import json, sys
import timm, torch, torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
import sd_zoo

rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
torch.manual_seed(42 + rank)  # as timm's train.py: seed + rank, before the model is created
model = timm.create_model('sd_resnet20_cifar', drop_path_rate=0.5, zero_init_last=False)
seed = model.stochastic_depth.generator.initial_seed()
ddp = DistributedDataParallel(model)  # default arguments: find_unused_parameters=False
opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
gates = []
for step in range(5):
    if step == 3:  # re-seeding each rank differently mid-run is agreed again at the next draw
        model.stochastic_depth.manual_seed(1000 + rank)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    opt.zero_grad()
    F.cross_entropy(ddp(x), y).backward()
    opt.step()
    gates.append(model.stochastic_depth.last_active)
params = [p.detach().double().sum().item() for p in model.parameters()]
json.dump({'seed': seed, 'gates': gates, 'params': params}, open(f'{out}/rank{rank}.json', 'w'))
dist.destroy_process_group()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_plain_ddp_two_gloo_ranks_with_different_seeds_drop_the_same_blocks(tmp_path):
    worker = tmp_path / 'worker.py'
    worker.write_text(DDP_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(worker), str(rank), port, str(tmp_path)], env=env,
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors[0][-3000:] + errors[1][-3000:]
    ranks = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2)]
    assert ranks[0]['seed'] != ranks[1]['seed'], 'the ranks were meant to start from different gate seeds'
    assert ranks[0]['gates'] == ranks[1]['gates']
    assert len({tuple(g) for g in ranks[0]['gates']}) > 1, 'the same draw in every step'
    assert not all(all(g) for g in ranks[0]['gates']), 'no block dropped: DDP would not meet unused parameters'
    # the averaged gradients kept the replicas identical
    assert ranks[0]['params'] == pytest.approx(ranks[1]['params'], rel=1e-6, abs=1e-6)


# --------------------------------------------------------------------------------------------- fx

def test_fx_traced_training_draws_per_step_like_eager():
    model = timm.create_model('sd_resnet20_cifar', drop_path_rate=0.5, drop_path_seed=7,
                              zero_init_last=False).train()
    traced = torch.fx.symbolic_trace(model)
    assert sum(n.op == 'call_function' and n.target.__name__ == 'gated_forward' for n in traced.graph.nodes) == 9
    x = small_input(model, 4)
    for _ in range(2):  # same generator state: the traced graph runs the eager draw and output
        state = model.stochastic_depth.generator.get_state()
        eager_out, eager_draw = model(x), model.stochastic_depth.last_active
        model.stochastic_depth.generator.set_state(state)
        torch.testing.assert_close(traced(x), eager_out)
        assert model.stochastic_depth.last_active == eager_draw
    draws, grad_sums = train_steps(traced, 6)
    assert len(set(draws)) > 1, 'the traced model kept one draw'
    assert all(total > 0 for total in grad_sums.values()), 'a block never trained'


def test_features_only_fx_trains_every_block():
    model = timm.create_model('sd_resnet20_cifar', features_only=True, feature_cls='fx', drop_path_rate=0.5,
                              drop_path_seed=7, zero_init_last=False).train()
    assert type(model).__name__ == 'FeatureGraphNet'
    draws, grad_sums = train_steps(model, 6, loss=lambda feats: sum(f.square().mean() for f in feats))
    assert len(set(draws)) > 1 and not all(all(d) for d in draws)
    assert all(total > 0 for total in grad_sums.values()), 'a block never trained'


def test_torchvision_create_feature_extractor_draws_per_step():
    from torchvision.models.feature_extraction import create_feature_extractor
    model = timm.create_model('sd_resnet20_cifar', drop_path_rate=0.5, drop_path_seed=7,
                              zero_init_last=False).train()
    extractor = create_feature_extractor(model, ['layer3'])
    draws, grad_sums = train_steps(extractor, 6, loss=lambda out: out['layer3'].square().mean())
    assert len(set(draws)) > 1
    assert all(total > 0 for total in grad_sums.values())
    x = small_input(model)
    torch.testing.assert_close(extractor.eval()(x)['layer3'], model.eval().forward_features(x))


# --------------------------------------------------------------------------------------------- TorchScript

@pytest.mark.parametrize('name', SCRIPTED)
@pytest.mark.parametrize('scaling', ['train', 'test'])
def test_scripted_eval_equals_eager(name, scaling):
    model = timm.create_model(name, drop_path_scaling=scaling, zero_init_last=False).eval()
    x = small_input(model)
    with torch.no_grad():
        expected = model(x)
        # the scripted graph may order float operations differently: tolerance relative to the logits' scale
        atol = 1e-5 * max(1.0, float(expected.abs().max()))
        assert torch.isfinite(expected).all()
        torch.testing.assert_close(torch.jit.script(model)(x), expected, rtol=1e-3, atol=atol)
        if name in ('sd_resnet20_cifar', 'sd_resnet50'):  # fx, then TorchScript
            torch.testing.assert_close(torch.jit.script(torch.fx.symbolic_trace(model))(x), expected,
                                       rtol=1e-5, atol=1e-5)


def test_scripted_model_in_training_mode_raises_a_clear_error():
    # timm's validate.py scripts a new model before calling .eval(): scripting in training mode must work
    model = timm.create_model('sd_resnet20_cifar', drop_path_rate=0.5, zero_init_last=False).train()
    scripted = torch.jit.script(model)
    x = small_input(model)
    with pytest.raises((RuntimeError, torch.jit.Error), match='torch.compile') as error:
        scripted(x)
    assert SCRIPTED_TRAINING_ERROR in str(error.value)
    torch.testing.assert_close(scripted.eval()(x), model.eval()(x))
    # without gates there is nothing to draw: a constant-depth model also runs scripted in training mode
    off = timm.create_model('sd_resnet20_cifar', drop_path_mode='off').train()
    torch.testing.assert_close(torch.jit.script(off)(x), off(x))


# --------------------------------------------------------------------------------------------- timm arguments

def _drop_blocks(model: nn.Module):
    return [(type(m.drop_block).__name__, getattr(m.drop_block, 'block_size', None))
            for m in model.modules() if hasattr(m, 'drop_block') and hasattr(m, 'conv2')]


def test_drop_block_rate_goes_where_timm_resnet_puts_it():
    ours = timm.create_model('sd_resnet50', drop_block_rate=0.1)
    theirs = timm.create_model('resnet50', drop_block_rate=0.1)
    assert _drop_blocks(ours) == _drop_blocks(theirs)
    assert {'DropBlock2d', 'Identity'} == {kind for kind, _ in _drop_blocks(ours)}
    assert ours.layer3[0].drop_block.drop_prob == 0.1
    # inside the branch, after the norm that precedes it: bn1 in basic blocks, bn2 in bottlenecks
    cifar = timm.create_model('sd_resnet20_cifar', drop_block_rate=0.2).train()
    assert isinstance(cifar.layer3[0].drop_block, DropBlock2d) and isinstance(cifar.layer2[0].drop_block, nn.Identity)
    seen = []
    cifar.layer3[0].drop_block.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    cifar.stochastic_depth.manual_seed(0)
    cifar.layer3[0].combine(torch.randn(2, 32, 8, 8), 1.0)
    assert seen == [(2, 64, 4, 4)]
    assert ours.state_dict().keys() == timm.create_model('sd_resnet50').state_dict().keys()


def test_timm_train_py_model_arguments_are_accepted():
    # what timm's train.py passes to create_model (None values are dropped by create_model)
    model = timm.create_model(
        'sd_resnet20_cifar', pretrained=False, in_chans=1, num_classes=7, drop_rate=0.1, drop_path_rate=0.3,
        drop_block_rate=0.1, global_pool='avgmax', bn_momentum=0.05, bn_eps=1e-3, scriptable=True)
    assert model.num_classes == 7 and model.conv1.in_channels == 1 and model.drop_rate == 0.1
    assert model.stochastic_depth.survival[-1] == pytest.approx(0.7)
    assert all(m.momentum == 0.05 and m.eps == 1e-3 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.eval()(torch.randn(2, 1, 16, 16)).shape == (2, 7)
    meta = timm.create_model('sd_resnet50', device='meta', dtype=torch.float64)
    assert {(t.device.type, t.dtype) for t in meta.parameters()} == {('meta', torch.float64)}


def test_unsupported_timm_resnet_arguments_are_named():
    timm.create_model('sd_resnet20_cifar', output_stride=32, avg_down=False, stem_type='')  # neutral values
    with pytest.raises(ValueError, match='output_stride=16'):
        timm.create_model('sd_resnet20_cifar', output_stride=16)
    with pytest.raises(ValueError, match='avg_down=True'):
        timm.create_model('sd_resnet50', avg_down=True)
    with pytest.raises(TypeError, match='not_a_model_arg'):
        timm.create_model('sd_resnet20_cifar', not_a_model_arg=1)


def test_reset_classifier_keeps_device_dtype_and_mode():
    model = timm.create_model('sd_resnet20_cifar').to(torch.float64).eval()
    model.reset_classifier(3)
    assert model.fc.weight.dtype == torch.float64 and not model.fc.training and not model.global_pool.training
