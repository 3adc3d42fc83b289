"""Every registered sd_ model: timm contract, training in each mode, real skipping, parity with timm."""
import copy
from typing import Dict, List

import pytest
import timm
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sd_zoo  # noqa: F401  (registers the models)
from sd_zoo.sd_resnet import SDResNet, scaled_norm

MODELS = timm.list_models('sd_*')
HEAVY = {'sd_resnet1202_cifar', 'sd_resnet152', 'sd_resnet101'}


def small_input(model: SDResNet, batch: int = 2, size: int = 0) -> torch.Tensor:
    """A cheap input: CIFAR nets at their 32x32, ImageNet nets at 64x64 (global pooling makes both valid)."""
    chans, height, _ = model.pretrained_cfg['input_size']
    size = size or (32 if height == 32 else 64)
    return torch.randn(batch, chans, size, size)


def count_conv_calls(model: nn.Module) -> Dict[str, List[int]]:
    """Forward and backward calls of every convolution, by module name."""
    calls: Dict[str, List[int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            calls[name] = [0, 0]
            module.register_forward_hook(lambda m, i, o, n=name: calls[n].__setitem__(0, calls[n][0] + 1))
            module.register_full_backward_hook(lambda m, gi, go, n=name: calls[n].__setitem__(1, calls[n][1] + 1))
    return calls


def test_registry_lists_every_family_member():
    expected = {f'sd_resnet{d}_cifar' for d in (20, 32, 44, 56, 110, 1202)}
    expected |= {'sd_resnet152_svhn', 'sd_resnet50', 'sd_resnet101', 'sd_resnet152'}
    assert expected <= set(MODELS)


def test_resnet110_parameter_count():
    model = timm.create_model('sd_resnet110_cifar')
    assert sum(p.numel() for p in model.parameters()) == 1_727_962


@pytest.mark.parametrize('name, blocks', [
    ('sd_resnet20_cifar', 9), ('sd_resnet110_cifar', 54), ('sd_resnet1202_cifar', 600),
    ('sd_resnet152_svhn', 75), ('sd_resnet50', 16), ('sd_resnet152', 50)])
def test_depth_and_block_count(name, blocks):
    model = timm.create_model(name)
    assert len(list(model.sd_blocks())) == blocks == model.stochastic_depth.num_blocks
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    downsample_convs = sum(b.downsample is not None and isinstance(b.downsample, nn.Sequential)
                           for b in model.sd_blocks())
    weight_layers = convs - downsample_convs + 1  # + fc; projection shortcuts are not counted as depth
    assert weight_layers == int(name.split('resnet')[1].split('_')[0])


@pytest.mark.parametrize('name', MODELS)
def test_eval_forward_shapes_and_finite(name):
    model = timm.create_model(name).eval()
    x = small_input(model)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, model.pretrained_cfg['num_classes'])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize('mode', ['block', 'sample', 'off'])
@pytest.mark.parametrize('name', MODELS)
def test_training_step_in_each_mode(name, mode):
    if name in HEAVY and mode != 'block':
        pytest.skip('heavy model: block mode covers it; the other modes run on the smaller members')
    torch.manual_seed(0)
    model = timm.create_model(name, drop_path_mode=mode).train()
    out = model(small_input(model, size=16 if 'cifar' in name or 'svhn' in name else 64))
    out.float().logsumexp(dim=1).mean().backward()
    assert torch.isfinite(out).all()
    assert model.conv1.weight.grad is not None and torch.isfinite(model.conv1.weight.grad).all()
    assert model.fc.weight.grad is not None


@pytest.mark.parametrize('dropped_grad', ['zero', 'none'])
def test_block_mode_never_runs_dropped_branches(dropped_grad):
    torch.manual_seed(0)
    model = timm.create_model('sd_resnet56_cifar', drop_path_rate=0.8, drop_path_grad=dropped_grad).train()
    calls = count_conv_calls(model)
    blocks = dict((id(b), b) for b in model.sd_blocks())
    block_of_conv = {}
    for name, module in model.named_modules():
        if id(module) in blocks:
            block_of_conv.update({f'{name}.conv1': module.sd_index, f'{name}.conv2': module.sd_index})
    model(small_input(model, 4).requires_grad_()).sum().backward()
    active = model.stochastic_depth.last_active
    assert 0 < sum(active) < len(active)  # the draw dropped some and kept some
    for conv_name, index in block_of_conv.items():
        expected = 1 if active[index] else 0
        assert calls[conv_name] == [expected, expected], (conv_name, active[index])
    for block, kept in zip(model.sd_blocks(), active):
        if dropped_grad == 'none':
            assert (block.conv1.weight.grad is not None) == kept
        elif not kept:  # a zero gradient, made without running the branch backward (the calls above)
            assert all(not p.grad.any() for p in block.parameters())
    assert calls['conv1'] == [1, 1]


def test_block_mode_transitional_block_can_be_dropped():
    model = timm.create_model('sd_resnet20_cifar', drop_path_schedule=[1.0] * 3 + [1e-9] + [1.0] * 5).train()
    x = small_input(model)
    out = model.forward_features(x)
    assert model.stochastic_depth.last_active[3] is False
    assert out.shape == (2, 64, 8, 8)
    bottleneck = timm.create_model('sd_resnet50', drop_path_schedule=[1e-9] + [1.0] * 15).train()
    feats = bottleneck.forward_features(small_input(bottleneck))
    assert bottleneck.stochastic_depth.last_active[0] is False
    assert feats.shape == (2, 2048, 2, 2)
    block = bottleneck.layer1[0]
    x0 = torch.randn(1, 64, 8, 8)
    torch.testing.assert_close(block.combine(x0, 0.0), torch.relu(block.downsample(x0)))


def test_sample_mode_computes_every_branch_with_per_sample_masks():
    torch.manual_seed(0)
    model = timm.create_model('sd_resnet20_cifar', drop_path_mode='sample', drop_path_rate=0.9).train()
    calls = count_conv_calls(model)
    x = small_input(model, 16)
    model(x)
    assert all(c[0] == 1 for c in calls.values())
    scales = model.stochastic_depth._scales
    assert len(scales) == 9 and scales[-1].shape == (16, 1, 1, 1)
    last = scales[-1].flatten()  # p = 0.1 for the last block: survivors scaled by 10
    assert all(v == 0.0 or v == pytest.approx(10.0) for v in last.tolist())
    assert 0 < int((last > 0).sum()) < 16


def test_off_mode_and_zero_rate_are_constant_depth():
    for kwargs in (dict(drop_path_mode='off'), dict(drop_path_rate=0.0)):
        model = timm.create_model('sd_resnet20_cifar', **kwargs).train()
        calls = count_conv_calls(model)
        model(small_input(model))
        assert all(c[0] == 1 for c in calls.values())
        assert not model.stochastic_depth.is_active


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing: bool):
        torch.manual_seed(0)
        model = timm.create_model('sd_resnet20_cifar', drop_path_seed=5).train()
        model.set_grad_checkpointing(checkpointing)
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        for _ in range(3):  # several steps, so several different draws
            model(x).square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters()}, model.stochastic_depth.last_active
    plain, active_plain = grads(False)
    checkpointed, active_ckpt = grads(True)
    assert active_plain == active_ckpt and not all(active_plain)
    for name, grad in plain.items():
        if grad is None:
            assert checkpointed[name] is None, name
        else:
            torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize('momentum', [0.1, None])
def test_scaled_norm_equals_scaling_the_norm_output(momentum):
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(8, momentum=momentum)
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    nn.init.normal_(norm.bias)
    ref = copy.deepcopy(norm)
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    for _ in range(2):  # two steps: the running statistics follow the same updates
        out, expected = scaled_norm(norm, x, 1 / 0.7), ref(x) * (1 / 0.7)
        torch.testing.assert_close(out, expected)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, norm.weight, norm.bias), grad)
        want = torch.autograd.grad(expected, (x, ref.weight, ref.bias), grad)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
    assert torch.equal(norm.running_mean, ref.running_mean) and torch.equal(norm.running_var, ref.running_var)
    assert int(norm.num_batches_tracked) == int(ref.num_batches_tracked) == 2
    norm.eval(), ref.eval()
    torch.testing.assert_close(scaled_norm(norm, x, 0.6), ref(x) * 0.6)  # test scaling at eval
    other = nn.GroupNorm(2, 8)  # not foldable: scaled the plain way
    torch.testing.assert_close(scaled_norm(other, x, 0.6), other(x) * 0.6)


class _ActivationOps(TorchDispatchMode):
    """Records the aten ops whose output has ``numel`` elements (the block's activations)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        if isinstance(first, torch.Tensor) and first.numel() == self.numel:
            self.ops.append(func.overloadpacket.__name__)
        return out


def activation_ops(block: nn.Module, x: torch.Tensor, scale: float) -> List[str]:
    x.grad = None
    with _ActivationOps(x.numel()) as recorder:
        block.combine(x, scale).sum().backward()
    return recorder.ops


@pytest.mark.parametrize('name', ['sd_resnet20_cifar', 'sd_resnet50'])
def test_kept_block_scales_without_an_extra_pass(name):
    """Inverted (train) scaling costs no extra op on the activations: the scale rides on the last BN's affine."""
    torch.manual_seed(0)
    model = timm.create_model(name, drop_path_rate=0.5).train()
    block = list(model.sd_blocks())[1]  # an identity block
    x = torch.relu(torch.randn(2, block.branch_norm().num_features, 8, 8)).requires_grad_()
    scaled, plain = activation_ops(block, x, 1 / 0.7), activation_ops(block, x, 1.0)
    # the same ops on the activations as an unscaled (constant-depth) block: the sum is in place, and the
    # backward has no extra multiplication (an out-of-place add with alpha=1/p would show 'add' and 'mul')
    assert scaled == plain
    assert 'add_' in scaled and not {'mul', 'mul_', 'div', 'div_'} & set(scaled)
    reference = copy.deepcopy(block)
    expected = torch.relu(x + type(reference).branch(reference, x) / 0.7)
    torch.testing.assert_close(block.combine(x, 1 / 0.7), expected)


@pytest.mark.parametrize('arch', ['resnet50', 'resnet101', 'resnet152'])
def test_strict_load_and_eval_parity_with_timm(arch):
    torch.manual_seed(0)
    reference = timm.create_model(arch)
    for module in reference.modules():  # non-trivial statistics so that every block matters
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data.uniform_(0.2, 0.6)
            module.bias.data.uniform_(-0.1, 0.1)
            module.running_var.data.uniform_(0.5, 1.5)
    ours = timm.create_model(f'sd_{arch}')
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
        [(k, v.shape) for k, v in reference.state_dict().items()]
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), reference.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize('name, shapes', [
    ('sd_resnet20_cifar', [(16, 32), (16, 32), (32, 16), (64, 8)]),
    ('sd_resnet50', [(64, 32), (256, 16), (512, 8), (1024, 4), (2048, 2)]),
])
def test_features_only_and_forward_intermediates(name, shapes):
    features = timm.create_model(name, features_only=True).eval()
    model = timm.create_model(name).eval()
    model.load_state_dict(features.state_dict(), strict=False)
    x = torch.randn(1, 3, 32 if 'cifar' in name else 64, 32 if 'cifar' in name else 64)
    with torch.no_grad():
        maps = features(x)
        final, intermediates = model.forward_intermediates(x)
    assert [(m.shape[1], m.shape[-1]) for m in maps] == shapes
    assert features.feature_info.channels() == [c for c, _ in shapes]
    assert [(m.shape[1], m.shape[-1]) for m in intermediates] == shapes
    torch.testing.assert_close(final, model.forward_features(x))
    assert len(model.forward_intermediates(x, indices=2, intermediates_only=True)) == 2


def test_head_contract():
    model = timm.create_model('sd_resnet20_cifar').eval()
    x = torch.randn(3, 3, 32, 32)
    feats = model.forward_features(x)
    assert model.forward_head(feats, pre_logits=True).shape == (3, model.num_features) == (3, 64)
    assert model.get_classifier() is model.fc and model.get_classifier(name_only=True) == 'fc'
    model.reset_classifier(7)
    assert model(x).shape == (3, 7)
    model.reset_classifier(0)
    assert model(x).shape == (3, 64)
    assert timm.create_model('sd_resnet20_cifar', num_classes=100, in_chans=1)(torch.randn(2, 1, 28, 28)).shape \
        == (2, 100)


def test_group_matcher_and_prune():
    model = timm.create_model('sd_resnet20_cifar')
    groups = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    names = list(groups.values())
    assert len(names) == 5 and 'conv1.weight' in names[0] and 'fc.weight' in names[-1]
    assert all(n.startswith(f'layer{i}.') for i in (1, 2, 3) for n in names[i])
    kept = model.prune_intermediate_layers(indices=[1, 2])
    assert kept == [1, 2] and model.num_features == 32 and len(model.layer3) == 0


@pytest.mark.parametrize('name', MODELS)
def test_pretrained_cfg_is_complete(name):
    cfg = timm.create_model(name).pretrained_cfg
    for field in ('input_size', 'pool_size', 'mean', 'std', 'first_conv', 'classifier', 'num_classes',
                  'license', 'paper_ids'):
        assert cfg.get(field) not in (None, ''), field
    # the architecture's paper, unless the weights are timm's (whose cfg cites the recipe's paper)
    assert '1603.09382' in cfg['paper_ids'] or cfg['hf_hub_id'].startswith('timm/')
