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
    folder = Path(__file__).resolve().parents[1] / 'benchmarks' / 'results'
    assert (folder / 'compile_cpu.json').exists()
    modes = {'sd_zoo block, compiled': 'regions', 'sd_zoo block, compiled, eager blocks': 'eager'}
    # the GPU's file, once benchmarks/gpu_check.sh has run on one, binds the 'cuda' entry the same way
    for name, device in (('compile_cpu.json', 'cpu'), ('compile_gpu.json', 'cuda')):
        if not (folder / name).exists():
            continue
        results = json.loads((folder / name).read_text())
        assert results['configs'], f'{name} holds no timed configuration'
        for res in results['configs']:
            best = readme._recommended(res['times_s'][results['clock']], 'sd_zoo block, compiled',
                                       ['sd_zoo block, compiled, eager blocks'])
            assert COMPILE_BLOCKS_BY_DEVICE[device] == modes[best], (name, res['model'], res['batch'])
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


def test_a_gpu_compile_run_gets_its_own_recommendation_rows(tmp_path):
    """benchmarks/gpu_check.sh writes compile_gpu.json: the README then recommends for one GPU from it (the card named)
    instead of saying it is owed. Checked on a compile benchmark's real results file given a GPU's name."""
    import json
    from pathlib import Path
    results = Path(__file__).resolve().parents[1] / 'benchmarks' / 'results'
    owed = readme.compile_recommendation(tmp_path)
    assert '| one GPU | not measured yet' in owed and '| several GPUs | not measured yet' in owed
    run = json.loads((results / 'compile_cpu.json').read_text())
    run['machine'] = dict(run['machine'], device='cuda', gpu='NVIDIA H100 80GB HBM3')
    run['bf16'] = True
    (tmp_path / 'compile_gpu.json').write_text(json.dumps(run))
    rows = readme.compile_recommendation(tmp_path).splitlines()
    gpu_rows = [r for r in rows if r.startswith('| one GPU')]
    assert len(gpu_rows) == 2 * len(run['configs'])
    res = run['configs'][0]
    where = f"{res['model']}, batch {res['batch']}"
    assert gpu_rows[0].startswith(f'| one GPU (NVIDIA H100 80GB HBM3, bf16), eager ({where}) | block mode')
    t = res['targets']['block compiled vs constant depth compiled']
    assert gpu_rows[1].startswith(f'| one GPU (NVIDIA H100 80GB HBM3, bf16), compiled ({where}) |')
    assert f'(block compiled: {readme.format_ratio(t)}, {t["verdict"]}) |' in gpu_rows[1]
    assert any(r.startswith('| several GPUs | not measured yet') for r in rows)


def test_the_gpu_summary_follows_the_cpu_one_once_written(tmp_path):
    """summary_gpu.md (benchmarks/gpu_check.sh) is rendered after summary_cpu.md; without it only the CPU one."""
    (tmp_path / 'summary_cpu.md').write_text('cpu table\n')
    assert readme.benchmark_table(tmp_path) == 'cpu table'
    (tmp_path / 'summary_gpu.md').write_text('Ratios of medians (wall time) on NVIDIA H100 80GB HBM3\n')
    rendered = readme.benchmark_table(tmp_path)
    assert rendered.startswith('cpu table\n\nOn a GPU') and rendered.endswith('on NVIDIA H100 80GB HBM3')
