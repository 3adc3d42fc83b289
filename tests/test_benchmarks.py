"""Smoke tests of the benchmark code paths (structure and semantics, never timings)."""
from __future__ import annotations

import json
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the repository root

from benchmarks import common, report, train_step  # noqa: E402

TINY = 'sd_resnet20_cifar'


def test_train_step_writes_ratios_and_accounting(tmp_path: Path) -> None:
    payload = train_step.main([
        '--reps', '1', '--cifar-model', TINY, '--cifar-batch', '4', '--imagenet-model', '',
        '--keep-denormals', '--out', str(tmp_path)])
    cifar = payload['cifar']
    expected = {'constant depth', 'sd_zoo block', 'sd_zoo sample', *common.PEERS, '(accounting) no block alive'}
    assert expected <= set(cifar['variants'])
    assert cifar['variants']['constant depth']['cpu_ratio'] == pytest.approx(1.0)
    assert all(v['reps'] == 1 and v['wall_median_s'] > 0 for v in cifar['variants'].values())
    assert cifar['limit_block_fraction'] == pytest.approx(6.5 / 9)
    assert len(cifar['block_mode_active_blocks']) == 1
    memory = cifar['saved_activation_bytes']
    assert memory['(accounting) no block alive']['saved_bytes'] < memory['constant depth']['saved_bytes']
    assert memory['timm DropPath']['saved_bytes'] >= memory['constant depth']['saved_bytes']
    accounting = cifar['accounting']
    assert {'non_block_fraction', 'limit_measured_block_costs', 'block_ratio_at_expected_depth',
            'fixed_draw_gap'} <= set(accounting)
    lo, hi = accounting['interval_95']['block_ratio_at_expected_depth']
    assert lo == pytest.approx(accounting['block_ratio_at_expected_depth']) == pytest.approx(hi)  # one repetition
    assert accounting['target'] == 0.78 and accounting['target_verdict'] in ('met', 'not met')
    on_disk = json.loads((tmp_path / 'train_step_cpu.json').read_text())
    assert on_disk['cifar']['variants'] == cifar['variants']
    table = (tmp_path / 'train_step_cpu.md').read_text()
    assert '| sd_zoo block |' in table and 'python -m benchmarks.train_step' in table
    assert f"| target: block mode at most 0.78x (at the expected depth) | {accounting['target_verdict']} |" in table
    summary = report.main(['--out', str(tmp_path)])
    assert '| sd_zoo block |' in summary and (tmp_path / 'summary_cpu.md').exists()
    assert 'target: block mode at most 0.78x' in summary and 'Target check' not in summary
    train_step.main(['--reps', '2', '--cifar-model', TINY, '--cifar-batch', '4', '--imagenet-model', '',
                     '--keep-denormals', '--bootstrap', '50', '--tag', 'cpu_long', '--out', str(tmp_path)])
    summary = report.main(['--out', str(tmp_path)])
    assert 'Target check, sd_resnet20_cifar, 2 repetitions' in summary
    assert '--tag cpu_long' in summary  # its command is among those that reproduce the summary


def _synthetic_run(reps: int, noise: float, seed: int = 0):
    """Step times of a perfect block mode on sd_resnet20_cifar (3 stages of 3 blocks): a fixed non-block part
    plus a fixed cost per block of each stage, nothing else; optional multiplicative noise per step."""
    rng = random.Random(seed)
    model = common.create_sd(TINY, 'off')
    survival = common.create_sd(TINY, 'block').stochastic_depth.survival
    non_block, cost = 0.1, [0.3, 0.2, 0.1]
    per_block = [c for c in cost for _ in range(3)]

    def timed(active) -> float:
        return (non_block + sum(c for c, a in zip(per_block, active) if a)) * (1 + rng.uniform(-noise, noise))

    realized = [[rng.random() < p for p in survival] for _ in range(reps)]
    times = {train_step.BASELINE: [timed([True] * 9) for _ in range(reps)],
             train_step.NO_BLOCKS: [timed([False] * 9) for _ in range(reps)],
             train_step.BLOCK: [timed(a) for a in realized]}
    for name, probs in train_step.accounting_schedules([3, 3, 3], survival).items():
        if name != train_step.NO_BLOCKS:
            times[name] = [timed([p == 1.0 for p in probs]) for _ in range(reps)]
    limit = (non_block + sum(c * p for c, p in zip(per_block, survival))) / (non_block + sum(per_block))
    return times, realized, model, survival, limit


def test_accounting_of_a_perfect_block_mode_finds_no_gap() -> None:
    times, realized, model, survival, limit = _synthetic_run(reps=9, noise=0.0)
    acc = train_step.account(times, realized, model, survival)
    assert acc['limit_measured_block_costs'] == pytest.approx(limit)
    assert acc['block_ratio_at_expected_depth'] == pytest.approx(limit)  # the draw's luck is corrected away
    assert acc['gap_to_limit'] == pytest.approx(0.0, abs=1e-12)
    assert acc['non_block_fraction'] == pytest.approx(0.1 / 1.9)
    assert acc['fixed_draw_gap'] == pytest.approx(0.0, abs=1e-12)
    assert acc['fixed_draw_blocks_per_stage'] == [round(sum(survival[i:i + 3])) for i in (0, 3, 6)]
    interval = train_step.bootstrap_interval(times, realized, model, survival, resamples=200)
    assert interval['gap_to_limit'] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert interval['block_ratio_at_expected_depth'] == pytest.approx([limit, limit])
    assert interval['fixed_draw_gap'] == pytest.approx([0.0, 0.0], abs=1e-12)
    lo, hi = interval['block_ratio_measured']
    assert lo < hi  # the raw median still moves with the draw


def test_fixed_draw_keeps_the_expected_blocks_of_each_stage() -> None:
    survival = common.create_sd('sd_resnet110_cifar', 'block').stochastic_depth.survival
    kept = train_step.fixed_draw([18, 18, 18], survival)
    assert [sum(kept[i:i + 18]) for i in (0, 18, 36)] == train_step.expected_per_stage([18, 18, 18], survival)
    assert kept == train_step.fixed_draw([18, 18, 18], survival)  # seeded: the same draw every run
    schedule = train_step.accounting_schedules([18, 18, 18], survival)[train_step.FIXED_DRAW]
    model = common.create_sd('sd_resnet110_cifar', 'block', drop_path_schedule=schedule).train()
    model(torch.randn(2, 3, 32, 32))
    assert list(model.stochastic_depth.last_active) == kept


def test_bootstrap_interval_covers_the_estimate_and_narrows_with_repetitions() -> None:
    widths = []
    for reps in (5, 40):
        times, realized, model, survival, limit = _synthetic_run(reps=reps, noise=0.05, seed=reps)
        acc = train_step.account(times, realized, model, survival)
        lo, hi = train_step.bootstrap_interval(times, realized, model, survival, resamples=300)[
            'block_ratio_at_expected_depth']
        assert lo <= acc['block_ratio_at_expected_depth'] <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0]


def test_verdict_needs_the_whole_interval_on_one_side() -> None:
    assert train_step.verdict([0.70, 0.77], 0.78) == 'met'
    assert train_step.verdict([0.79, 0.81], 0.78) == 'not met'
    assert train_step.verdict([0.77, 0.79], 0.78).startswith('undecided')
    values = [0.5, 0.1, 0.9, 0.3]
    assert train_step.percentile(values, 0) == 0.1 and train_step.percentile(values, 100) == 0.9
    assert train_step.percentile(values, 50) == pytest.approx(0.4)  # numpy's linear rule


def test_peers_share_weights_and_only_mask_in_training() -> None:
    torch.manual_seed(0)
    base = common.create_sd(TINY, 'off', num_classes=10).eval()
    survival = common.create_sd(TINY, 'block').stochastic_depth.survival
    x = torch.randn(4, 3, 32, 32)
    for peer in common.PEERS:
        model = common.add_peer_drop(common.create_sd(TINY, 'off', base.state_dict(), num_classes=10), peer, survival)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), base(x))  # the peers are identities at eval
        assert all(b.peer_drop.training for b in model.train().sd_blocks())


def test_add_peer_drop_refuses_a_stochastic_model() -> None:
    with pytest.raises(ValueError, match='constant-depth'):
        common.add_peer_drop(common.create_sd(TINY, 'block'), 'timm DropPath', [0.5] * 9)


def test_alternate_rotates_the_order() -> None:
    calls = []
    steps = {name: (lambda n=name: calls.append(n)) for name in 'abc'}
    times = common.alternate(steps, reps=3, warmup=0)
    assert calls == list('abc' 'bca' 'cab')
    assert set(times) == {'wall', 'cpu'} and all(len(t) == 3 for t in times['wall'].values())


def test_saved_activation_bytes_counts_inputs_not_parameters() -> None:
    layer = torch.nn.Linear(64, 8)
    x = torch.randn(16, 64, requires_grad=True)
    with common.saved_activation_bytes(layer) as saved:
        layer(x).sum().backward()
    assert saved['bytes'] == x.numel() * x.element_size()


@pytest.mark.slow
def test_ddp_two_ranks_drop_the_same_blocks(tmp_path: Path) -> None:
    from benchmarks import ddp
    reps = 2
    payload = ddp.main(['--quick', '--reps', str(reps), '--keep-denormals', '--without-ddp', '--out', str(tmp_path)])
    assert payload['rank_gate_mismatches'] == 0
    variants = {**ddp.VARIANTS, **ddp.UNSYNCED}
    # the blocks the timed steps kept: rank 0's gate sequence after the warm-up draws, in every block variant
    # (replayed by the package's own draw: each training forward's first gate call draws every block's gate)
    sd = common.create_sd(TINY, 'block', seed=ddp.GATE_SEED, num_classes=10).stochastic_depth
    draws = []
    for _ in range(ddp.WARMUP_ROUNDS + reps):
        sd.gate(0, torch.empty(1), training=True)
        draws.append(sum(sd.last_active))
    draws = draws[ddp.WARMUP_ROUNDS:]
    kept = payload['kept_blocks']
    assert kept['of'] == sd.num_blocks and kept['expected'] == pytest.approx(sd.expected_depth)
    assert kept['per_variant'] == {label: sum(draws) / reps for label, v in variants.items() if v[0] == 'block'}
    markdown = (tmp_path / 'ddp_cpu.md').read_text()
    assert f"kept {sum(draws) / reps:.2f} of {sd.num_blocks} blocks" in markdown
    assert set(payload['variants']) == set(variants)
    assert payload['synchronized'] == {label: label not in ddp.UNSYNCED for label in variants}
    # --without-ddp: the ratios that separate DDP's own cost from two processes sharing the machine
    cpu = payload['times_s']['cpu']
    assert list(payload['diagnostics']) == [name for name, _, _ in ddp.DIAGNOSTICS]
    for name, num, den in ddp.DIAGNOSTICS:
        diagnostic = payload['diagnostics'][name]
        assert diagnostic['ratio'] == pytest.approx(common.median(cpu[num]) / common.median(cpu[den]))
        assert f'| {name} | {report.format_ratio(diagnostic)} |' in markdown
    # (a region may still compile its first graph while timed, when a block shape is first kept then)
    assert payload['compiled_while_timed']['recompiles'] == 0
    assert set(payload['profiles']) == set(ddp.PROFILED) and all('Self CPU' in t for t in payload['profiles'].values())


@pytest.mark.slow
def test_sample_mode_compiles_to_one_graph(tmp_path: Path) -> None:
    from benchmarks import compile as compile_bench
    payload = compile_bench.main(['--quick', '--no-timing', '--keep-denormals', '--out', str(tmp_path)])
    assert payload['graphs']['sample'] == {'graphs': 1, 'graph_breaks': 0, 'break_reasons': []}
    assert payload['graphs']['block']['graph_breaks'] > 0


def test_compile_events_count_graphs_and_recompiles() -> None:
    torch._dynamo.reset()
    scaled = torch.compile(lambda x, k: x * k, backend='eager')
    graphs = common.clear_compile_events()
    scaled(torch.ones(2), 2)
    assert common.compile_events(graphs)['recompiles'] == 0
    scaled(torch.ones(2), 3)  # an int is specialized on: a second value recompiles
    events = common.compile_events(graphs)
    assert (events['graphs'], events['recompiles']) == (2, 1)
    assert events['recompile_reasons'] and 'k' in events['recompile_reasons'][0]


@pytest.mark.parametrize('isolate', [True, False])
def test_compiled_variants_keep_their_own_cache_entries(isolate: bool) -> None:
    """The benchmark's variants share the package's code; isolated, none runs through another's frames (no
    recompile after all warm-ups). Not isolated, the constant-depth model meets block mode's ``forward`` entry,
    which does not guard on the mode, and recompiles: what the timed rounds used to pay."""
    from benchmarks import compile as compile_bench
    torch._dynamo.reset()
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    weights = common.create_sd(TINY, 'off', num_classes=10).state_dict()
    steps = {}
    for variant in (compile_bench.BASELINE, compile_bench.BLOCK, compile_bench.SAMPLE):
        model = compile_bench.build_model(TINY, variant, weights, torch.device('cpu'), False, backend='eager',
                                          isolate=isolate)
        steps[variant] = common.TrainStep(model, x, y, torch.device('cpu'), False)
        compile_bench.warm_up(steps[variant], torch.device('cpu'))
    settled = compile_bench.settle(steps, torch.device('cpu'))
    if isolate:
        assert settled['recompiles'] == 0 and settled['graphs'] == 0
    else:
        assert settled['recompiles'] >= 1 and any('mode' in r for r in settled['recompile_reasons'])


def test_dropped_grad_compares_the_same_draws(tmp_path: Path) -> None:
    from benchmarks import dropped_grad
    payload = dropped_grad.main(['--quick', '--reps', '2', '--batch', '4', '--keep-denormals', '--out', str(tmp_path)])
    assert payload['same_draws_in_every_variant'] and set(payload['variants']) == set(dropped_grad.GRADS)
    assert payload['variants'][dropped_grad.BASELINE]['cpu_ratio'] == pytest.approx(1.0)
    assert payload['within_limit'] == (payload['variants'][dropped_grad.ZERO]['cpu_ratio'] <= 1.02)
    assert 'python -m benchmarks.dropped_grad' in (tmp_path / 'dropped_grad_cpu.md').read_text()


@pytest.mark.slow
def test_attempt_cond_gates_match_eager_in_float64() -> None:
    from benchmarks.attempts import cond_gates
    torch._dynamo.reset()
    for way in ('cond', 'saved'):
        check = cond_gates.check_against_eager(way, blocks=3, channels_last=True)
        assert check['max_rel_grad_diff'] < 1e-9 and check['max_buffer_diff'] < 1e-9, (way, check)


@pytest.mark.slow
def test_attempt_kept_runs_trains_like_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm
    import torch.nn.functional as F

    from benchmarks.attempts import kept_runs
    from sd_zoo import sd_resnet
    monkeypatch.setattr(sd_resnet, 'compiled_gated_blocks', kept_runs._dispatch)
    torch._dynamo.reset()
    kept_runs.RUN_LENGTHS.clear()
    torch.manual_seed(0)
    eager = timm.create_model(TINY, num_classes=10, drop_path_seed=5)
    grouped = timm.create_model(TINY, num_classes=10, drop_path_seed=5)
    grouped.load_state_dict(eager.state_dict())
    grouped.kept_run_max = 3
    compiled = torch.compile(grouped)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    for _ in range(3):  # new draws each step, the same in both models
        F.cross_entropy(eager(x), y).backward()
        F.cross_entropy(compiled(x), y).backward()
        assert grouped.stochastic_depth.last_active == eager.stochastic_depth.last_active
    for (name, a), b in zip(grouped.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert max(kept_runs.RUN_LENGTHS) > 1, kept_runs.RUN_LENGTHS  # blocks did run several to a region


@pytest.mark.slow
def test_attempt_skipped_frames_rebuilds_the_callback_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attempt 13's 'before' variant trains like eager and hands its frames to dynamo at every step, which the
    package's path (frames skipped in dynamo's C frame evaluation) does not."""
    import timm
    import torch.nn.functional as F

    from benchmarks.attempts import skipped_frames
    from sd_zoo import sd_resnet
    monkeypatch.setattr(sd_resnet, 'compiled_gated_blocks', skipped_frames._dispatch)
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = timm.create_model(TINY, num_classes=10, drop_path_seed=5)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    frames_per_step, warm_steps = {}, 8
    for callback_frames in (False, True):
        model = timm.create_model(TINY, num_classes=10, drop_path_seed=5)
        model.load_state_dict(eager.state_dict())
        model.callback_frames = callback_frames
        compiled = torch.compile(model)
        for _ in range(warm_steps):  # warm-up: a region compiles when a run of its length is first kept
            F.cross_entropy(compiled(x), y).backward()
        before = torch._dynamo.utils.counters['frames']['total']
        F.cross_entropy(compiled(x), y).backward()
        frames_per_step[callback_frames] = torch._dynamo.utils.counters['frames']['total'] - before
    for _ in range(warm_steps + 1):  # the eager model draws what each compiled model drew
        F.cross_entropy(eager(x), y).backward()
    assert model.stochastic_depth.last_active == eager.stochastic_depth.last_active
    for (name, a), b in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert frames_per_step[False] == 0, frames_per_step
    assert frames_per_step[True] >= len(list(model.sd_blocks())), frames_per_step  # one a block at least


@pytest.mark.slow
def test_attempt_region_runs_rebuilds_one_block_a_region(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attempt 14's 'before' variant trains like eager and runs one block a compiled call (length-1 regions only),
    where the package's path runs kept blocks several to a call."""
    import timm
    import torch.nn.functional as F

    from benchmarks.attempts import region_runs
    from sd_zoo import sd_resnet
    monkeypatch.setattr(sd_resnet, 'compiled_gated_blocks', region_runs._dispatch)
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = timm.create_model(TINY, num_classes=10, drop_path_seed=5)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    lengths = {}
    for one_block in (False, True):
        sd_resnet.reset_compiled_regions()
        model = timm.create_model(TINY, num_classes=10, drop_path_seed=5)
        model.load_state_dict(eager.state_dict())
        model.one_block_regions = one_block
        compiled = torch.compile(model)
        for _ in range(4):
            F.cross_entropy(compiled(x), y).backward()
        lengths[one_block] = {n for _, n in sd_resnet._REGIONS}
    for _ in range(4):  # the eager model draws what each compiled model drew
        F.cross_entropy(eager(x), y).backward()
    assert model.stochastic_depth.last_active == eager.stochastic_depth.last_active
    for (name, a), b in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert lengths[True] == {1}, lengths
    assert max(lengths[False]) > 1, lengths
    sd_resnet.reset_compiled_regions()


def test_attempt_compiled_bound_prunes_to_what_block_mode_runs() -> None:
    """The bound's pruned model computes what block mode computes on the fixed draw: same output and gradients
    (float64, eager), one downsampling block dropped and one identity block dropped among them."""
    from benchmarks.attempts import compiled_bound
    name = 'sd_resnet20_cifar'
    weights = common.create_sd(name, 'off', num_classes=10).state_dict()
    sizes = train_step.stage_sizes(common.create_sd(name, 'off', num_classes=10))
    kept = [True] * sum(sizes)
    kept[1], kept[sizes[0]] = False, False  # an identity block and stage 2's downsampling block
    schedule = [1.0 if k else 1e-9 for k in kept]
    block = common.create_sd(name, 'block', weights, drop_path_schedule=schedule, num_classes=10).double()
    pruned = compiled_bound.prune_to(common.create_sd(name, 'off', weights, num_classes=10), kept).double()
    assert sum(isinstance(m, compiled_bound.DroppedDownsample) for m in pruned.modules()) == 1
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    out_block, out_pruned = block.train()(x), pruned.train()(x)
    assert block.stochastic_depth.last_active == kept
    torch.testing.assert_close(out_pruned, out_block, rtol=0, atol=1e-12)
    out_block.square().sum().backward()
    out_pruned.square().sum().backward()
    grads = {n: p.grad for n, p in pruned.named_parameters()}
    for n, p in block.named_parameters():
        if n in grads:
            torch.testing.assert_close(grads[n], p.grad, rtol=0, atol=1e-10, msg=n)
    with pytest.raises(ValueError, match='the draw 3'):
        compiled_bound.prune_to(common.create_sd(name, 'off', num_classes=10), [True] * 3)


def test_attempt_compiled_bound_dynamic_variant_has_regions_of_its_own() -> None:
    """The dynamic-batch variant must not share code objects (and so compiled graphs) with the package's regions:
    a dynamic graph's guards accept any batch, so shared code would let one variant run the other's graphs."""
    from benchmarks.attempts import compiled_bound
    from sd_zoo import sd_resnet
    sd_resnet.reset_compiled_regions()
    static, dynamic = (common.create_sd('sd_resnet20_cifar', 'block', num_classes=10) for _ in range(2))
    dynamic.stochastic_depth.dynamic_batch_regions = True
    x = torch.randn(2, 16, 32, 32)
    block_s, block_d = next(static.sd_blocks()), next(dynamic.sd_blocks())
    assert sd_resnet.region_key(block_s) == sd_resnet.region_key(block_d)
    fn_s, fn_d = compiled_bound._region_for(block_s, x), compiled_bound._region_for(block_d, x)
    assert fn_s.__code__ is not fn_d.__code__
    assert fn_s is sd_resnet._region_for(block_s, x)  # the package's region for the static variant
    assert fn_d is compiled_bound._region_for(block_d, x)
    assert x._dynamo_weak_dynamic_indices == {0}
    sd_resnet.reset_compiled_regions()


def test_committed_summary_is_rendered_from_the_committed_results(tmp_path: Path) -> None:
    import shutil
    results = Path(__file__).resolve().parents[1] / 'benchmarks' / 'results'
    for path in results.glob('*.json'):
        shutil.copy(path, tmp_path / path.name)
    summary = (results / 'summary_cpu.md').read_text()
    # rendered with the options its own reproduce line names (say, a further compile run's tag)
    command = [line for line in summary.splitlines() if line.startswith('python -m benchmarks.report')]
    assert len(command) == 1, 'summary_cpu.md names no `python -m benchmarks.report` command to reproduce it'
    rendered = report.main(shlex.split(command[0])[3:] + ['--out', str(tmp_path)])
    assert rendered == summary, \
        f'benchmarks/results/summary_cpu.md is stale: run `{command[0]}`, then `python -m tools.readme`'


def test_report_names_a_missing_further_compile_run(tmp_path: Path) -> None:
    results = Path(__file__).resolve().parents[1] / 'benchmarks' / 'results'
    (tmp_path / 'train_step_cpu.json').write_text((results / 'train_step_cpu.json').read_text())
    with pytest.raises(SystemExit, match='--more-compile nosuch: no compile_nosuch.json'):
        report.main(['--out', str(tmp_path), '--more-compile', 'nosuch'])
    with pytest.raises(SystemExit, match=r'--more-ddp nosuch: no ddp_nosuch.json .* `python -m benchmarks.ddp --tag'):
        report.main(['--out', str(tmp_path), '--more-ddp', 'nosuch'])
    assert not (tmp_path / 'summary_cpu.md').exists()


def test_report_lists_a_further_ddp_run_with_its_batch_and_rounds(tmp_path: Path) -> None:
    results = Path(__file__).resolve().parents[1] / 'benchmarks' / 'results'
    (tmp_path / 'train_step_cpu.json').write_text((results / 'train_step_cpu.json').read_text())
    ddp = json.loads((results / 'ddp_cpu.json').read_text())
    ddp_rows = {name: report.format_ratio(t) for name, t in ddp['targets'].items()}
    other = dict(ddp, batch_per_rank=7, reps=3, command='python -m benchmarks.ddp --batch-per-rank 7 --tag cpu_b7')
    other['targets'] = {name: dict(t, ratio=t['ratio'] / 2) for name, t in ddp['targets'].items()}
    (tmp_path / 'ddp_cpu.json').write_text(json.dumps(ddp))
    (tmp_path / 'ddp_cpu_b7.json').write_text(json.dumps(other))
    summary = report.main(['--out', str(tmp_path), '--more-ddp', 'cpu_b7'])
    for name, t in other['targets'].items():
        assert f"| DDP, 2 CPU ranks, {ddp['model']}, 7 images a rank (3 rounds): {name} | {report.format_ratio(t)} |" \
            in summary
    for name, text in ddp_rows.items():
        assert f"{ddp['batch_per_rank']} images a rank ({ddp['reps']} rounds): {name} | {text} |" in summary
    assert 'python -m benchmarks.ddp --batch-per-rank 7 --tag cpu_b7' in summary
    assert 'python -m benchmarks.report --tag cpu --more-ddp cpu_b7' in summary


def test_ddp_times_unwrapped_models_only_when_asked() -> None:
    from benchmarks import ddp
    assert ddp.variants_of(ddp.parse_args([])) == ddp.VARIANTS
    assert ddp.variants_of(ddp.parse_args(['--without-ddp'])) == {**ddp.VARIANTS, **ddp.UNSYNCED}
    assert {num for _, num, _ in ddp.DIAGNOSTICS} | {den for _, _, den in ddp.DIAGNOSTICS} <= {
        *ddp.VARIANTS, *ddp.UNSYNCED}


@pytest.mark.slow
def test_gpu_check_script_runs_its_steps_on_the_cpu(tmp_path: Path) -> None:
    """``benchmarks/gpu_check.sh --cpu-smoke``: the GPU check's own commands (bf16, channels_last, both benchmarks,
    the report) at small sizes on the CPU, so the script cannot rot before a GPU's device time is spent on it."""
    script = Path(__file__).resolve().parents[1] / 'benchmarks' / 'gpu_check.sh'
    env = dict(os.environ, OUT=str(tmp_path))
    done = subprocess.run(['bash', str(script), '--cpu-smoke'], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    step = json.loads((tmp_path / 'train_step_cpu_smoke.json').read_text())
    assert step['machine']['device'] == 'cpu'
    assert step['settings']['bf16'] and step['settings']['channels_last']
    assert step['cifar']['variants']['sd_zoo block']['cpu_ratio'] > 0
    compiled = json.loads((tmp_path / 'compile_cpu_smoke.json').read_text())
    assert compiled['bf16'] and compiled['channels_last']
    (config,) = compiled['configs']
    assert (config['model'], config['batch'], config['reps']) == ('sd_resnet20_cifar', 8, 2)
    assert config['while_timed']['recompiles'] == 0
    summary = (tmp_path / 'summary_cpu_smoke.md').read_text()
    assert 'compiled training step, sd_resnet20_cifar b8 (2 rounds)' in summary
    bad = subprocess.run(['bash', str(script), '--bogus'], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and 'usage: bash benchmarks/gpu_check.sh [--cpu-smoke]' in bad.stderr
