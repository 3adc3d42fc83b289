"""The command line of sd_zoo: export, publish, render cards, print the table of published weights.

    sd-zoo-export --run results/fashion_mnist/<run> --tag fashion_mnist --out exports/<name> --card-dir hub_cards
    sd-zoo-publish exports/<name> --repo-id sd-zoo/<name> [--private] [--revision B] [--create-pr] [--dry-run]
    sd-zoo-hub cards [--out hub_cards] [--check]   # (re)write the card of every published weight
    sd-zoo-hub table                               # the README table of published weights

``sd-zoo-hub`` is also ``python -m sd_zoo.cli``. The work is done one layer down (:mod:`sd_zoo.publishing`,
:mod:`sd_zoo.cards`, :mod:`sd_zoo.hub`); this module only parses arguments and reports errors.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .cards import card_filename, readme_table, render_card
from .hub import PretrainedWeightsError, check_export_target, create_model, export_model, write_text_atomic
from .load_errors import available_weights
from .pretrained import find_weight
from .publishing import LocalHubCache, export_run, publish, render_all_cards

__all__ = ['main', 'export_main', 'publish_main']


def _export_parser(sub: Any) -> None:
    p = sub.add_parser('export', help='write a Hub-ready folder (model.safetensors, config.json, README.md)')
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--run', help='training run folder (results.json, model.safetensors, config.json)')
    src.add_argument('--model', help='registered weight <model>.<tag> to export as published (downloads it)')
    p.add_argument('--tag', help='pretrained tag of the export, e.g. fashion_mnist (default: the run dataset)')
    p.add_argument('--out', required=True, help='output folder: new, empty or a previous export (replaced '
                   'atomically); never a training run')
    p.add_argument('--overwrite', action='store_true', help='replace --out even if it holds other files')
    p.add_argument('--card-dir', help='also write the card there as <model>.<tag>.md (e.g. hub_cards)')
    p.add_argument('--baseline-run', help='constant-depth twin of --run, compared with it in the card')


def _publish_parser(sub: Any) -> None:
    p = sub.add_parser('publish', help='upload an exported folder to the Hub and print the commit to pin')
    p.add_argument('folder')
    p.add_argument('--repo-id', required=True, help='org/name on the Hub')
    p.add_argument('--private', action='store_true')
    p.add_argument('--revision', help='branch to commit to (created from main if needed)')
    p.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing')
    p.add_argument('--message', help='commit message')
    p.add_argument('--dry-run', action='store_true', help='list what would be uploaded, upload nothing')
    p.add_argument('--cache-dir', help='write a Hugging Face cache folder here instead of uploading')


def _run_export(args: argparse.Namespace) -> None:
    if args.run:
        out = export_run(args.run, args.out, tag=args.tag, card_dir=args.card_dir, baseline_run=args.baseline_run,
                         overwrite=args.overwrite)
    else:
        weight = find_weight(args.model)
        if weight is None:
            raise SystemExit(f'{args.model} is not a published weight; {available_weights(args.model.split(".")[0])}')
        check_export_target(args.out, args.overwrite)
        model = create_model(args.model, pretrained=True)
        card = render_card(weight)
        out = export_model(model, args.out, card, tag=weight.tag, overwrite=args.overwrite)
        if args.card_dir:
            write_text_atomic(Path(args.card_dir) / card_filename(weight), card)
    print(f'exported {out}: ' + ', '.join(sorted(p.name for p in Path(out).iterdir())))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='sd-zoo-hub', description=__doc__.split('\n\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    _export_parser(sub)
    _publish_parser(sub)
    cards = sub.add_parser('cards', help='render the card of every published weight (sd_zoo/pretrained.py)')
    cards.add_argument('--out', default='hub_cards', help='folder of the cards (default: ./hub_cards)')
    cards.add_argument('--check', action='store_true', help='fail if a committed card is stale')
    sub.add_parser('table', help='print the README table of published weights')
    args = parser.parse_args(argv)
    try:
        if args.command == 'export':
            _run_export(args)
        elif args.command == 'publish':
            api = LocalHubCache(args.cache_dir) if args.cache_dir else None
            publish(args.folder, args.repo_id, private=args.private, revision=args.revision,
                    create_pr=args.create_pr, commit_message=args.message, dry_run=args.dry_run, api=api)
        elif args.command == 'cards':
            stale = render_all_cards(args.out, check=args.check)
            print(('stale: ' if args.check else 'written: ') + (', '.join(stale) or 'none'))
            return 1 if (args.check and stale) else 0
        else:
            print(readme_table(), end='')
    except (PretrainedWeightsError, FileNotFoundError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


def export_main() -> int:
    return main(['export', *sys.argv[1:]])


def publish_main() -> int:
    return main(['publish', *sys.argv[1:]])


if __name__ == '__main__':
    sys.exit(main())
