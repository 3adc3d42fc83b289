"""README.md's generated tables agree with the registry, the recipes and the committed results files."""
from tools import readme


def test_readme_is_up_to_date(capsys):
    assert readme.main(['--check']) == 0, capsys.readouterr().err


def test_render_replaces_only_marked_blocks():
    text = 'intro\n<!-- BEGIN paper -->\nstale\n<!-- END paper -->\noutro\n'
    out = readme.render(text)
    assert out.startswith('intro\n<!-- BEGIN paper -->\n| paper result |') and out.endswith('<!-- END paper -->\noutro\n')
    assert 'stale' not in out and '5.25' in out
