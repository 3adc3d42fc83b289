"""README.md's generated tables agree with the registry, the recipes and the committed results files."""
from tools import readme


def test_readme_is_up_to_date(capsys):
    assert readme.main(['--check']) == 0, capsys.readouterr().err


def test_render_replaces_only_marked_blocks():
    text = 'intro\n<!-- BEGIN paper -->\nstale\n<!-- END paper -->\noutro\n'
    out = readme.render(text)
    assert out.startswith('intro\n<!-- BEGIN paper -->\n| paper result |') and out.endswith('<!-- END paper -->\noutro\n')
    assert 'stale' not in out and '5.25' in out


def test_compile_flag_auto_follows_the_measured_cpu_results():
    """--compile-blocks auto on a CPU is the compiled block-mode variant the README recommends for every committed
    CPU config: regions (the default) unless the eager blocks are faster beyond the run's noise (the rule of
    :func:`tools.readme._recommended`; a median a tenth of a percent lower does not flip it)."""
    import json
    from pathlib import Path

    from training.recipes import COMPILE_BLOCKS_BY_DEVICE, resolve_compile_blocks
    results = json.loads((Path(__file__).resolve().parents[1] / 'benchmarks' / 'results' / 'compile_cpu.json')
                         .read_text())
    assert results['configs'], 'compile_cpu.json holds no timed configuration'
    modes = {'sd_zoo block, compiled': 'regions', 'sd_zoo block, compiled, eager blocks': 'eager'}
    for res in results['configs']:
        best = readme._recommended(res['times_s'][results['clock']], 'sd_zoo block, compiled',
                                   ['sd_zoo block, compiled, eager blocks'])
        assert COMPILE_BLOCKS_BY_DEVICE['cpu'] == modes[best], (res['model'], res['batch'])
    assert resolve_compile_blocks('auto', 'cpu') == COMPILE_BLOCKS_BY_DEVICE['cpu']
    assert resolve_compile_blocks('regions', 'cpu') == 'regions'


def test_recommendation_needs_a_difference_beyond_the_noise():
    """The rule the README and --compile-blocks auto follow: a clearly faster variant wins, a tie keeps the default
    even when its median happens to be lower."""
    import random
    import statistics
    rng = random.Random(0)
    base = [1.0 + 0.05 * rng.random() for _ in range(41)]
    tie = [1.0 + 0.05 * rng.random() for _ in range(41)]  # the same distribution, drawn independently
    tie = [t - (statistics.median(tie) - statistics.median(base)) - 1e-4 for t in tie]  # a median just below
    assert statistics.median(tie) < statistics.median(base)
    times = {'default': base, 'tie': tie, 'faster': [t * 0.9 for t in base]}
    assert readme._recommended(times, 'default', ['tie']) == 'default'
    assert readme._recommended(times, 'default', ['tie', 'faster']) == 'faster'


def test_each_measured_ddp_workload_gets_its_own_recommendation(tmp_path):
    """A DDP results file of tools.readme.DDP_RUNS gets a row naming its batch a rank; a missing one gets none."""
    import json
    import shutil
    from pathlib import Path
    results = Path(__file__).resolve().parents[1] / 'benchmarks' / 'results'
    assert [name for name, _ in readme.DDP_RUNS if not (results / name).exists()] == []
    shutil.copy(results / 'ddp_cpu_b64.json', tmp_path / 'ddp_cpu_b64.json')
    rows = [r for r in readme.compile_recommendation(tmp_path).splitlines() if 'DDP processes' in r]
    assert len(rows) == 1 and "64 images a rank: the paper's recipe" in rows[0]
    run = json.loads((results / 'ddp_cpu_b64.json').read_text())
    best = readme._recommended(run['times_s'][run['clock']], 'sd_zoo block',
                               ['sd_zoo block, compiled', 'sd_zoo block, find_unused_parameters'])
    advice = {'sd_zoo block': 'not compiled', 'sd_zoo block, compiled': '`torch.compile(DDP(model))`',
              'sd_zoo block, find_unused_parameters': '`find_unused_parameters`'}
    assert advice[best] in rows[0]
