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
    """--compile-blocks auto on a CPU is the faster compiled block-mode variant of every committed CPU config."""
    import json
    from pathlib import Path

    from training.recipes import COMPILE_BLOCKS_BY_DEVICE, resolve_compile_blocks
    results = json.loads((Path(__file__).resolve().parents[1] / 'benchmarks' / 'results' / 'compile_cpu.json')
                         .read_text())
    assert results['configs'], 'compile_cpu.json holds no timed configuration'
    for res in results['configs']:
        v, clock = res['variants'], results['clock']
        faster = min(('regions', 'sd_zoo block, compiled'), ('eager', 'sd_zoo block, compiled, eager blocks'),
                     key=lambda pair: v[pair[1]][f'{clock}_median_s'])[0]
        assert COMPILE_BLOCKS_BY_DEVICE['cpu'] == faster, (res['model'], res['batch'])
    assert resolve_compile_blocks('auto', 'cpu') == COMPILE_BLOCKS_BY_DEVICE['cpu']
    assert resolve_compile_blocks('regions', 'cpu') == 'regions'
