"""torch.compile on a default sd_ model (block mode): no recompiles from draws, blocks or scales; dropped blocks'
branches not run; gradients equal to eager for the same gates (issue 13). Timing lives in benchmarks/compile.py."""
import copy

import pytest
import timm
import torch
import torch._dynamo
import torch.nn.functional as F

import sd_zoo  # noqa: F401
from sd_zoo import sd_resnet

MODEL = 'sd_resnet20_cifar'
COMPILE_BLOCKS = ['regions', 'eager']  # the default (runs of kept blocks as compiled regions), and eager blocks


def make(compile_blocks: str, seed: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=10, drop_path_seed=seed)
    model.stochastic_depth.compile_blocks = compile_blocks
    return model


def step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    F.cross_entropy(model(x), y).backward()


def possible_regions(model: torch.nn.Module) -> set:
    """Every (block signature, run length) region a draw can use: the kept identity blocks of one signature in a
    row (dropped ones between them do not break the run) are cut into runs of ``REGION_RUN_LENGTHS``; a
    downsampling block runs alone."""
    regions, group = set(), []
    for block in list(model.sd_blocks()) + [None]:
        if block is not None and block.downsample is None and (
                not group or sd_resnet.region_key(group[0]) == sd_resnet.region_key(block)):
            group.append(block)
            continue
        if group:
            key = sd_resnet.region_key(group[0])
            regions |= {(key, n) for n in sd_resnet.REGION_RUN_LENGTHS if n <= len(group)}
        group = [block] if block is not None and block.downsample is None else []
        if block is not None and block.downsample is not None:
            regions.add((sd_resnet.region_key(block), 1))
    return regions


def warm_up(compiled: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
            sizes=(None,)) -> None:
    """Train steps until every block has run at least once at every batch size and, with 'regions', every region
    has: a region (a run length of kept blocks of one shape) compiles the first time such a run is kept (once per
    shape and length, not per draw)."""
    expected = possible_regions(model) if model.stochastic_depth.compile_blocks == 'regions' else set()
    for n in sizes:
        size = x[:n].shape[0]
        seen = [False] * model.stochastic_depth.num_blocks
        for _ in range(60):
            step(compiled, x[:n], y[:n])
            seen = [a or b for a, b in zip(seen, model.stochastic_depth.last_active)]
            ran = {key for key, r in sd_resnet._REGIONS.items() if size in r.batches_seen}
            if all(seen) and ran == expected:
                break
        assert all(seen)
        assert {key for key, r in sd_resnet._REGIONS.items() if size in r.batches_seen} == expected


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    sd_resnet.reset_compiled_regions()
    yield
    torch._dynamo.reset()
    sd_resnet.reset_compiled_regions()


@pytest.mark.parametrize('compile_blocks', COMPILE_BLOCKS)
def test_new_draws_and_a_smaller_last_batch_do_not_recompile(compile_blocks):
    model = make(compile_blocks)
    compiled = torch.compile(model)
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    warm_up(compiled, model, x, y, sizes=(6, 4))  # 4: the last batch of an epoch, one recompile of stem/head
    counters = torch._dynamo.utils.counters
    graphs, frames = counters['stats']['unique_graphs'], counters['frames']['total']
    draws = set()
    with torch.compiler.set_stance('fail_on_recompile'):  # any recompile raises
        for i in range(6):
            n = 6 if i % 2 else 4
            step(compiled, x[:n], y[:n])
            draws.add(tuple(model.stochastic_depth.last_active))
    assert counters['stats']['unique_graphs'] == graphs, 'a new graph was compiled after warm-up'
    # no frame reaches dynamo's Python callback after warm-up: the frames that run the regions are skipped in its C
    # frame evaluation (sd_resnet._skipped_frame), not offered to it at every call
    assert counters['frames']['total'] == frames, 'dynamo was handed a frame after warm-up'
    assert len(draws) > 1, 'the gates must be drawn anew in every step'


def test_regions_are_static_for_two_batch_sizes_then_one_dynamic_graph():
    model = make('regions')
    compiled = torch.compile(model)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    counters = torch._dynamo.utils.counters
    warm_up(compiled, model, x, y, sizes=(8, 6))
    regions = list(sd_resnet._REGIONS.values())
    # five block signatures (stage 1, and a downsampling and an identity block in stages 2 and 3), three blocks
    # a stage: identity runs of 1 and 2 blocks; each region its own code
    assert {key for key, _ in sd_resnet._REGIONS} == {sd_resnet.region_key(b) for b in model.sd_blocks()}
    assert len(regions) == 8 and len({r.fn.__code__ for r in regions}) == 8
    assert all(r.static_batches == {8, 6} for r in regions)
    graphs = counters['stats']['unique_graphs']
    warm_up(compiled, model, x, y, sizes=(4,))
    # a third batch size: a graph with a dynamic batch per region (two where a region ran on the output of a
    # dropped block, a view, and on a tensor that is not)
    dynamic = counters['stats']['unique_graphs'] - graphs
    assert len(regions) <= dynamic <= 2 * len(regions)
    warm_up(compiled, model, x, y, sizes=(5, 3, 8, 6, 4))  # any other size reuses them; the first two keep theirs
    assert counters['stats']['unique_graphs'] == graphs + dynamic
    assert all(r.static_batches == {8, 6} for r in regions)


@pytest.mark.parametrize('compile_blocks', COMPILE_BLOCKS)
def test_compiled_step_runs_no_convolution_of_a_dropped_block(compile_blocks):
    model = make(compile_blocks)
    compiled = torch.compile(model)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    warm_up(compiled, model, x, y)  # compile first (the profiler would also count the ops traced meanwhile)
    kepts = []
    for _ in range(3):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model.zero_grad()
            compiled(x)
        convs = sum(e.count for e in prof.key_averages() if e.key == 'aten::convolution')
        kepts.append(sum(model.stochastic_depth.last_active))
        assert convs == 1 + 2 * kepts[-1], (convs, kepts[-1])  # the stem, and two per kept basic block
    assert min(kepts) < model.stochastic_depth.num_blocks  # some blocks were dropped


@pytest.mark.parametrize('checkpointing', [False, True])
@pytest.mark.parametrize('compile_blocks', COMPILE_BLOCKS)
def test_compiled_gradients_equal_eager_for_the_same_gates(compile_blocks, checkpointing):
    eager = make(compile_blocks)
    eager.set_grad_checkpointing(checkpointing)
    twin = copy.deepcopy(eager)  # same weights, same gate generator state
    compiled = torch.compile(twin)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 10, (4,), generator=gen)
        eager.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
        step(eager, x, y)
        step(compiled, x, y)
        assert eager.stochastic_depth.last_active == twin.stochastic_depth.last_active
        assert not all(eager.stochastic_depth.last_active)
        for (name, p), q in zip(eager.named_parameters(), twin.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, b), c in zip(eager.named_buffers(), twin.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize('compile_blocks', COMPILE_BLOCKS)
def test_compiled_features_only_model_trains_like_eager(compile_blocks):
    """timm's features_only wrapper runs the blocks one by one: each gets the same compiled treatment."""
    torch.manual_seed(0)
    eager = timm.create_model(MODEL, features_only=True, drop_path_seed=3)
    sd = next(m.stochastic_depth for m in eager.modules() if hasattr(m, 'stochastic_depth'))
    sd.compile_blocks = compile_blocks
    twin = copy.deepcopy(eager)
    twin_sd = next(m.stochastic_depth for m in twin.modules() if hasattr(m, 'stochastic_depth'))
    compiled = torch.compile(twin)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(4, 3, 16, 16, generator=gen)
        eager.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
        sum(f.sum() for f in eager(x)).backward()
        sum(f.sum() for f in compiled(x)).backward()
        assert sd.last_active == twin_sd.last_active
        for (name, p), q in zip(eager.named_parameters(), twin.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:  # summed feature maps: gradients of order 1, float32 reduction order differs
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-3, msg=lambda m: f'{name}: {m}')
    assert not all(sd.last_active)


@pytest.mark.parametrize('compile_blocks', COMPILE_BLOCKS)
def test_compiled_step_saves_no_bool_mask(compile_blocks):
    """No compiled graph saves a ReLU's bool mask for the backward (inductor's CPU code writes bool tensors about 20x
    slower than eager; benchmarks/README.md, "torch.compile"): the regions end with ReLUSignBackward."""
    model = make(compile_blocks)
    compiled = torch.compile(model)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    warm_up(compiled, model, x, y)
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(compiled(x), y)
    loss.backward()
    assert len(saved) > 10  # the hooks saw the compiled graphs' saved tensors
    assert not [s for s in saved if s[0] == torch.bool and len(s[1]) == 4], saved


@pytest.mark.parametrize('compiled', [False, True])
def test_relu_sign_backward_is_relu(compiled):
    """Forward and gradient of ``torch.relu`` exactly, zeros and negatives included, eager and compiled."""
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, 3.5]).repeat(40).reshape(2, 4, 5, 5).requires_grad_()
    grad = torch.randn(x.shape)
    fn = torch.compile(sd_resnet.ReLUSignBackward.apply) if compiled else sd_resnet.ReLUSignBackward.apply
    out = fn(x)
    (dx,) = torch.autograd.grad(out, x, grad)
    x_ref = x.detach().clone().requires_grad_()
    out_ref = torch.relu(x_ref)
    (dx_ref,) = torch.autograd.grad(out_ref, x_ref, grad)
    assert torch.equal(out, out_ref) and torch.equal(dx, dx_ref)
    assert dx[x.detach() > 0].ne(0).all() and dx[x.detach() <= 0].eq(0).all()


def test_compiled_eval_is_one_graph_and_equals_eager():
    model = make('eager').eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        explanation = torch._dynamo.explain(model)(x)
        got = torch.compile(model)(x)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_compile_blocks_must_be_known():
    model = make('eager')
    with pytest.raises(ValueError, match=r"compile_blocks='fast' is unknown: use one of \('regions', 'eager'\)"):
        model.stochastic_depth.compile_blocks = 'fast'


def test_a_run_of_kept_blocks_spans_a_dropped_identity_block():
    """A dropped identity block is the identity, so the kept blocks around it run as one region: stage 1 of
    ResNet-20 with its middle block dropped runs blocks 1 and 3 in one call of length 2, with eager's gradients."""
    schedule = [1.0] * 9
    schedule[1] = 1e-9  # never kept
    torch.manual_seed(0)
    eager = timm.create_model(MODEL, num_classes=10, drop_path_schedule=schedule)
    twin = copy.deepcopy(eager)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    step(eager, x, y)
    step(torch.compile(twin), x, y)
    assert eager.stochastic_depth.last_active == twin.stochastic_depth.last_active == [True, False] + [True] * 7
    stage1 = sd_resnet.region_key(next(twin.sd_blocks()))
    assert {n for key, n in sd_resnet._REGIONS if key == stage1} == {2}
    for (name, p), q in zip(eager.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
