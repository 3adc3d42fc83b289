"""The stochastic-depth rule: schedules, gate statistics, seeding, scaling conversion, bad input."""
import math

import pytest
import timm
import torch

import sd_zoo
from sd_zoo import StochasticDepth, fold_test_scaling, survival_probabilities
from sd_zoo.stochastic_depth import SCALING_KEY


def test_linear_schedule_is_the_papers_formula():
    num_blocks, p_last = 54, 0.5
    expected = [1 - (l / num_blocks) * (1 - p_last) for l in range(1, num_blocks + 1)]
    assert survival_probabilities(num_blocks, 1 - p_last, 'linear') == pytest.approx(expected, abs=1e-15)
    # the first block can be dropped (timm's rule starts at 0), the last one has p_L
    assert survival_probabilities(num_blocks, 0.5)[0] == pytest.approx(1 - 0.5 / 54)
    assert survival_probabilities(num_blocks, 0.5)[-1] == pytest.approx(0.5)


def test_uniform_and_explicit_schedules():
    assert survival_probabilities(4, 0.2, 'uniform') == pytest.approx([0.8] * 4)
    assert survival_probabilities(3, 0.9, [1.0, 0.7, 0.25]) == [1.0, 0.7, 0.25]
    assert survival_probabilities(3, 0.0, 'linear') == [1.0, 1.0, 1.0]


def test_expected_depth_of_resnet110_is_40_25_of_54():
    model = timm.create_model('sd_resnet110_cifar')
    assert model.stochastic_depth.num_blocks == 54
    assert model.stochastic_depth.expected_depth == pytest.approx(40.25)
    assert model.stochastic_depth.expected_depth == pytest.approx((3 * 54 - 1) / 4)


def _draw_many(sd: StochasticDepth, draws: int) -> torch.Tensor:
    x = torch.zeros(2, 1, 1, 1)
    kept = torch.zeros(sd.num_blocks)
    for _ in range(draws):
        for index in range(sd.num_blocks):
            sd.gate(index, x, training=True)
        kept += torch.tensor(sd.last_active, dtype=torch.float)
    return kept / draws


@pytest.mark.parametrize('schedule', ['linear', 'uniform', [0.95, 0.2, 0.6, 1.0, 0.5]])
def test_survival_frequency_matches_p_l(schedule):
    sd = StochasticDepth(5, drop_path_rate=0.6, schedule=schedule, seed=1234)
    draws = 6000
    freq = _draw_many(sd, draws)
    probs = torch.tensor(sd.survival)
    bound = 5 * torch.sqrt(probs * (1 - probs) / draws) + 1e-9  # 5 sigma per block
    assert torch.all((freq - probs).abs() <= bound), (freq, probs)


def test_one_draw_per_forward_and_scales_follow_the_draw():
    sd = StochasticDepth(6, drop_path_rate=0.5, seed=0)
    x = torch.zeros(1)
    scales = [sd.gate(i, x, training=True) for i in range(6)]
    for scale, kept, p in zip(scales, sd.last_active, sd.survival):
        assert scale == (pytest.approx(1 / p) if kept else 0.0)
    state = sd.generator.get_state()
    sd.gate(0, x, training=True)  # a new pass draws once, for all blocks
    after_one = sd.generator.get_state()
    for i in range(1, 6):
        sd.gate(i, x, training=True)
    assert not torch.equal(state, after_one)
    assert torch.equal(after_one, sd.generator.get_state())


def test_eval_gates_for_both_scalings():
    x = torch.zeros(1)
    train = StochasticDepth(4, 0.5, scaling='train', seed=0)
    test = StochasticDepth(4, 0.5, scaling='test', seed=0)
    assert [train.gate(i, x, training=False) for i in range(4)] == [1.0] * 4
    assert [test.gate(i, x, training=False) for i in range(4)] == test.survival
    # test scaling trains without any rescaling of the survivors
    assert set(test.gate(i, x, training=True) for i in range(4)) <= {0.0, 1.0}


def test_generator_state_round_trip_replays_the_same_drops():
    sd = StochasticDepth(20, 0.5, seed=7)
    _draw_many(sd, 3)
    saved = sd.state_dict()
    first = [tuple(_draw_once(sd)) for _ in range(5)]
    sd.load_state_dict(saved)
    assert [tuple(_draw_once(sd)) for _ in range(5)] == first


def _draw_once(sd: StochasticDepth):
    for index in range(sd.num_blocks):
        sd.gate(index, torch.zeros(1), training=True)
    return sd.last_active


def test_same_seed_same_drop_sequence_different_seed_differs():
    a, b, c = (StochasticDepth(30, 0.5, seed=s) for s in (3, 3, 4))
    seq_a = [tuple(_draw_once(a)) for _ in range(10)]
    assert seq_a == [tuple(_draw_once(b)) for _ in range(10)]
    assert seq_a != [tuple(_draw_once(c)) for _ in range(10)]


def test_global_seed_makes_model_gates_reproducible():
    def sequence():
        torch.manual_seed(11)
        model = timm.create_model('sd_resnet20_cifar').train()
        x = torch.randn(2, 3, 16, 16)
        out = []
        for _ in range(5):
            model(x)
            out.append(tuple(model.stochastic_depth.last_active))
        return out
    assert sequence() == sequence()


def test_fold_test_scaling_keeps_eval_outputs():
    torch.manual_seed(0)
    model = timm.create_model('sd_resnet20_cifar', drop_path_scaling='test', drop_path_rate=0.7)
    for module in model.modules():  # non-trivial BatchNorms so that the fold is visible
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
            module.running_mean.data.uniform_(-0.1, 0.1)
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        as_plain = timm.create_model('sd_resnet20_cifar', drop_path_rate=0.7).eval()
        state = model.state_dict()
        with pytest.raises(ValueError, match="drop_path_scaling='test'"):  # the scaling travels with the weights
            as_plain.load_state_dict(state)
        state.pop(SCALING_KEY)
        as_plain.load_state_dict(state)
        assert not torch.allclose(as_plain(x), before, atol=1e-4)  # the scaling matters before folding
        fold_test_scaling(model)
        assert model.stochastic_depth.scaling == 'train'
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
        as_plain.load_state_dict(model.state_dict())
        torch.testing.assert_close(as_plain(x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kwargs, fragments', [
    (dict(drop_path_rate=1.0), ['drop_path_rate', '1.0', '[0, 1)']),
    (dict(drop_path_rate=-0.1), ['drop_path_rate', '-0.1', '[0, 1)']),
    (dict(drop_path_rate=float('nan')), ['drop_path_rate', 'nan']),
    (dict(drop_path_mode='layer'), ['drop_path_mode', "'layer'", "'block', 'sample', 'off'"]),
    (dict(drop_path_schedule='cosine'), ['drop_path_schedule', "'cosine'", "'linear', 'uniform'"]),
    (dict(drop_path_scaling='none'), ['drop_path_scaling', "'none'", "'train', 'test'"]),
    (dict(drop_path_schedule=[0.5] * 8), ['drop_path_schedule', 'has 8', '9 residual blocks']),
    (dict(drop_path_schedule=[0.5] * 8 + [0.0]), ['drop_path_schedule', '0.0', '(0, 1]']),
    (dict(drop_path_schedule=[1.5] * 9), ['drop_path_schedule', '1.5', '(0, 1]']),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, fragments):
    with pytest.raises(ValueError) as info:
        timm.create_model('sd_resnet20_cifar', **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_package_exports():
    assert sd_zoo.StochasticDepth is StochasticDepth
    assert math.isclose(StochasticDepth(54, 0.5).expected_depth, 40.25)
